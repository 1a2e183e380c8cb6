"""Upload and restore of a remote backup against fsspec's own ``put`` / ``get`` of the same bytes.

    python benchmarks/remote_speed.py [--mb 200] [--files 4] [--repeats 3] [--stores s3 gs]

Against local servers on 127.0.0.1, started here (moto's S3 server in this process, the GCS
emulator in its own, as the tests run them). The state is ``--files`` files of ``--mb`` MB in all,
random bytes, written into a staging folder as an adapter would. For each store:

    backup   RemoteSlot.commit: checksum every file, upload them (several at once), confirm the
             lease, write the manifest; against fs.put_file of the same files one after the other
             (what a plain copy costs: no checksum, no manifest, no lease)
    restore  RemoteSlot.fetch: list, download every file (several at once) and verify its checksum;
             against fs.get_file of the same files

Medians over ``--repeats``, and the ratio ours / fsspec. Both run against the same server in the same
run: compare the ratios, not the seconds (moto shares this process's CPU with the client).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # the emulator has no gRPC API
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.remote.servers import BUCKET, GCSServer, S3Server, unique_url  # noqa: E402
from unified_backup.manifest import Counters, Header  # noqa: E402
from unified_backup.remote_slot import RemoteSlot  # noqa: E402


def measure(server, args: argparse.Namespace, work: Path) -> dict[str, float]:
    url = unique_url(server)
    slot = RemoteSlot(url, storage_options=server.storage_options, staging_dir=work / "staging")
    lease = slot.lock()
    lease.acquire()
    fs, root = slot.store.fs, slot.store.root
    size = int(args.mb * 1e6 / args.files)
    source = work / "source"
    source.mkdir(exist_ok=True)
    for i in range(args.files):
        (source / f"part-{i}.bin").write_bytes(os.urandom(size))
    header = Header("bench", "0", Counters(1, 0, 1), {"w": "float32[1]"})
    times: dict[str, list[float]] = {"ours-backup": [], "put": [], "ours-restore": [], "get": []}
    try:
        for _ in range(args.repeats):
            staged = slot.stage()
            for part in sorted(source.iterdir()):
                os.link(part, staged / part.name)
            began = time.perf_counter()
            manifest = slot.commit(staged, header)
            times["ours-backup"].append(time.perf_counter() - began)

            began = time.perf_counter()
            for part in sorted(source.iterdir()):
                fs.put_file(str(part), f"{root}/plain/{part.name}")
            times["put"].append(time.perf_counter() - began)

            slot.cleanup()
            began = time.perf_counter()
            slot.fetch(manifest)
            times["ours-restore"].append(time.perf_counter() - began)
            slot.cleanup()

            target = work / "get"
            target.mkdir(exist_ok=True)
            began = time.perf_counter()
            for part in sorted(source.iterdir()):
                fs.get_file(f"{root}/plain/{part.name}", str(target / part.name))
            times["get"].append(time.perf_counter() - began)
    finally:
        lease.release()
        slot.delete()
        fs.rm(f"{root}/plain", recursive=True)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=200.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stores", nargs="+", default=["s3", "gs"], choices=["s3", "gs"])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for store in args.stores:
            server = S3Server() if store == "s3" else GCSServer(Path(tmp) / "gcs-data")
            server.start()
            try:
                if store == "s3":
                    server.make_bucket(BUCKET)
                work = Path(tmp) / store
                work.mkdir()
                medians = measure(server, args, work)
            finally:
                server.stop()
            rows.append((store, medians))
    print(f"{args.mb:g} MB in {args.files} files, median of {args.repeats}\n")
    print("| store | backup (s) | fs.put (s) | backup / put | restore (s) | fs.get (s) | restore / get |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for store, m in rows:
        print(
            f"| {store} | {m['ours-backup']:.2f} | {m['put']:.2f} | {m['ours-backup'] / m['put']:.2f} | "
            f"{m['ours-restore']:.2f} | {m['get']:.2f} | {m['ours-restore'] / m['get']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
