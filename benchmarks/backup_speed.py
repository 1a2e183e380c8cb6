"""Backup and restore speed, side by side in one run: our adapters against the anchors and the disk.

    python benchmarks/backup_speed.py [--sizes 10 200] [--repeats 5] [--layers 1] [--methods ...]
                                      [--json FILE] [--plot FILE.png] [--dir DIR]

Every (method, size) runs in a fresh process, one after the other, on the same disk (``--dir``,
default the system temp dir). The state is a model whose weights and Adam moments together are
``size`` MB: ``--layers`` square dense layers without bias (one by default; many small tensors
cost more per byte). Methods:

    floor                 write the same bytes with numpy and fsync (and, for restore, read them back)
    keras                 our BackupAndRestore, Keras 3, save_freq=1: per backup, durable and checksummed
    keras-builtin         keras.callbacks.BackupAndRestore(save_freq=1) (no fsync, no checksum)
    tf-checkpointmanager  tf.train.CheckpointManager.save of the same model and optimizer
    lightning             our BackupAndRestore, Lightning, save_freq=1
    lightning-save        Trainer.save_checkpoint (no fsync, no checksum)
    keras-async           our Keras backup with async_backup=True: the time training stalls (snapshot)
    lightning-async       the same for Lightning

The async methods give the time the backup hook held training (the snapshot; each step after it
waits, untimed, until the background write has committed, as a training step longer than the write
would), and in the JSON ``writer_s``, the background writer's time per backup. After the table, each
async stall is given as a fraction of the synchronous backup of the same adapter and size.

For each: the median time of a backup over ``--repeats`` steps (each method's first backup or save
is a warm-up and not counted: ours checks it once per fit for objects it could not load safely),
its ratio to the floor, the extra peak memory during a backup (resident memory sampled about every
millisecond, above what it was when the backup began: a lower bound, short peaks can be missed),
and for ours and the floor the restore time (one restore for ours, verification included) and its
ratio to a raw read of the same bytes (page cache, so noisy). The table is printed as markdown;
``--json`` writes every sample; ``--plot`` draws time against size for every method (matplotlib).
Figures depend on the machine and its disk: compare ratios measured in one run, never across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    "floor", "keras", "keras-async", "keras-builtin", "tf-checkpointmanager", "lightning", "lightning-async",
    "lightning-save",
)  # fmt: skip
OURS = ("keras", "lightning")
MB = 1 << 20


# -- measuring, inside one fresh process -------------------------------------------------------
class PeakMemory:
    """Resident memory sampled every millisecond in a thread; :meth:`extra` over a marked interval."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._lock = threading.Lock()
        self._interval = 0  # counts begin() calls: a sample read before one is dropped
        self._start = self._peak = 0
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while self._running:
            interval, value = self._interval, self.rss()
            with self._lock:
                if interval == self._interval:
                    self._peak = max(self._peak, value)
            time.sleep(0.001)

    def begin(self) -> None:
        with self._lock:
            self._interval += 1
            self._start = self._peak = self.rss()

    def extra(self) -> int:
        """Peak resident memory above the value at :meth:`begin`."""
        with self._lock:
            return max(self._peak, self.rss()) - self._start

    def stop(self) -> None:
        self._running = False


def side(size_mb: float, layers: int = 1) -> int:
    """Width of ``layers`` square dense layers whose weights and two Adam moments hold ``size_mb`` MB."""
    return max(8, int((size_mb * MB / 4 / 3 / layers) ** 0.5))


def measure_floor(size_mb: float, repeats: int, work: Path) -> dict[str, Any]:
    import numpy as np

    data = np.random.default_rng(0).integers(0, 255, int(size_mb * MB), dtype=np.uint8)
    memory = PeakMemory()
    backups, restores, extras = [], [], []
    for i in range(repeats):
        path = work / f"floor-{i}.bin"
        memory.begin()
        began = time.perf_counter()
        with open(path, "wb") as f:
            data.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        backups.append(time.perf_counter() - began)
        extras.append(memory.extra())
        began = time.perf_counter()
        back = np.fromfile(path, dtype=np.uint8)
        restores.append(time.perf_counter() - began)
        assert back.nbytes == data.nbytes
        path.unlink()
    memory.stop()
    return {"bytes": data.nbytes, "backup_s": backups, "restore_s": restores, "extra_bytes": extras}


def committed(backup_dir: Path, global_step: int, timeout: float = 600.0) -> None:
    """Wait (untimed) until the backup of ``global_step`` is committed: an async backup's write is done."""
    from unified_backup import Slot

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manifest = Slot(backup_dir).read_manifest()
        if manifest is not None and manifest.global_step >= global_step:
            return
        time.sleep(0.002)
    raise SystemExit(f"the background write of step {global_step} did not commit in {timeout} s")


def measure_lightning(size_mb: float, repeats: int, work: Path, method: str, layers: int) -> dict[str, Any]:
    import lightning.pytorch as L
    import torch

    from lightning_impl import BackupAndRestore

    torch.set_num_threads(1)
    width = side(size_mb, layers)
    builtin, background = method == "lightning-save", method == "lightning-async"

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Sequential(
                *(torch.nn.Linear(width, width, bias=False) for _ in range(layers))
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

        def train_dataloader(self) -> Any:  # longer than the run: every measured backup is a step's
            x = torch.zeros(repeats + 3, width)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=1)

    memory = PeakMemory()
    samples: dict[str, list[float]] = {"backup_s": [], "extra_bytes": []}

    began = [0.0]

    class Around(L.Callback):
        """Marks the begin of the batch-end hooks (listed first) and their end (listed last)."""

        def __init__(self, end: bool) -> None:
            self.end = end

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if not self.end:
                memory.begin()
                began[0] = time.perf_counter()
                if builtin:  # the anchor: Lightning's own save (the first, at step 1, not counted)
                    trainer.save_checkpoint(work / f"lightning-{trainer.global_step}.ckpt")
            elif trainer.global_step > 1:  # the first backup also checks loadability: not counted
                samples["backup_s"].append(time.perf_counter() - began[0])
                samples["extra_bytes"].append(memory.extra())
            if self.end and background:
                committed(backup_dir, trainer.global_step)

    backup_dir = work / "lightning-backup"
    callbacks: list[Any] = [Around(end=False)]
    if not builtin:
        ours = BackupAndRestore(backup_dir, save_freq=1, delete_checkpoint=False, async_backup=background)
        callbacks.append(ours)
    callbacks.append(Around(end=True))
    trainer = L.Trainer(
        max_steps=repeats + 1, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Model())
    result: dict[str, Any] = {"bytes": _state_bytes(width, layers), **samples}
    if background:
        result["writer_s"] = ours.stats.writer_seconds / max(ours.stats.backups, 1)
    if method == "lightning":
        restore = BackupAndRestore(backup_dir, delete_checkpoint=False)
        again = L.Trainer(
            max_steps=repeats + 1, callbacks=[restore], accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        again.fit(Model())
        result["restore_s"] = [restore.stats.restore_seconds]
    memory.stop()
    return result


def measure_keras(size_mb: float, repeats: int, work: Path, method: str, layers: int) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_impl import BackupAndRestore

    width = side(size_mb, layers)
    memory = PeakMemory()
    samples: dict[str, list[float]] = {"backup_s": [], "extra_bytes": []}

    def build() -> Any:
        dense = [keras.layers.Dense(width, use_bias=False) for _ in range(layers)]
        model = keras.Sequential([keras.Input((width,)), *dense])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        return model

    def timed(call: Callable[[], Any], step: int) -> None:
        memory.begin()
        began = time.perf_counter()
        call()
        if step > 1:  # the first backup also builds what later ones reuse: not counted
            samples["backup_s"].append(time.perf_counter() - began)
            samples["extra_bytes"].append(memory.extra())

    model = build()
    x = np.zeros((repeats + 1, width), np.float32)
    backup_dir = work / "keras-backup"
    callbacks: list[Any] = []
    ours = None
    if method in ("keras", "keras-async"):
        background = method == "keras-async"

        class TimedOurs(BackupAndRestore):  # the whole hook, as for the other methods
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                timed(lambda: super(TimedOurs, self).on_train_batch_end(batch, logs), batch + 1)
                if background:
                    committed(backup_dir, batch + 1)

        ours = TimedOurs(backup_dir, save_freq=1, delete_checkpoint=False, async_backup=background)
        callbacks = [ours]
    elif method == "keras-builtin":

        class Timed(keras.callbacks.BackupAndRestore):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                timed(lambda: super(Timed, self).on_train_batch_end(batch, logs), batch + 1)

        callbacks = [Timed(str(backup_dir), save_freq=1, delete_checkpoint=False)]
    else:
        manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=model, optimizer=model.optimizer), str(backup_dir), max_to_keep=1
        )

        class Manager(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                timed(manager.save, batch + 1)

        callbacks = [Manager()]
    model.fit(x, x, batch_size=1, epochs=1, callbacks=callbacks, verbose=0)
    result: dict[str, Any] = {"bytes": _state_bytes(width, layers), **samples}
    if ours is not None and ours.async_backup:
        result["writer_s"] = ours.stats.writer_seconds / max(ours.stats.backups, 1)
    elif ours is not None:
        restore = BackupAndRestore(backup_dir, delete_checkpoint=False)
        build().fit(x, x, batch_size=1, epochs=1, callbacks=[restore], verbose=0)
        result["restore_s"] = [restore.stats.restore_seconds]
    memory.stop()
    return result


def _state_bytes(width: int, layers: int) -> int:
    return 3 * 4 * width * width * layers  # weights and two Adam moments, float32


def child(method: str, size_mb: float, repeats: int, work: Path, layers: int) -> dict[str, Any]:
    if method == "floor":
        return measure_floor(size_mb, repeats, work)
    if method.startswith("lightning"):
        return measure_lightning(size_mb, repeats, work, method, layers)
    return measure_keras(size_mb, repeats, work, method, layers)


# -- the side-by-side run ------------------------------------------------------------------------
def run_one(method: str, size_mb: float, repeats: int, root: Path, layers: int) -> dict[str, Any]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(dir=root) as work:
        argv = [sys.executable, __file__, "--child", method, str(size_mb), "--repeats", str(repeats)]
        argv += ["--layers", str(layers)]
        done = subprocess.run(
            [*argv, "--dir", work],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
    if done.returncode != 0:
        raise SystemExit(f"{method} at {size_mb} MB failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    floors = {r["size_mb"]: r for r in results if r["method"] == "floor"}
    lines = [
        "| size | method | backup (median s) | x floor | extra peak (x state) | restore (s) | x raw read |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        floor = floors.get(r["size_mb"])
        backup = statistics.median(r["backup_s"])
        ratio = f"{backup / statistics.median(floor['backup_s']):.2f}" if floor else "-"
        extra = f"{max(r['extra_bytes']) / r['bytes']:.2f}"
        restore, read = "-", "-"
        if r.get("restore_s"):
            restore = f"{statistics.median(r['restore_s']):.3f}"
            if floor:
                read = f"{statistics.median(r['restore_s']) / statistics.median(floor['restore_s']):.2f}"
        lines.append(
            f"| {r['size_mb']:g} MB | {r['method']} | {backup:.4f} | {ratio} | {extra} | {restore} | {read} |"
        )
    synchronous = {(r["method"], r["size_mb"]): statistics.median(r["backup_s"]) for r in results}
    for r in results:
        sync = synchronous.get((r["method"].removesuffix("-async"), r["size_mb"]))
        if r["method"].endswith("-async") and sync:
            stall = statistics.median(r["backup_s"])
            lines.append(
                f"\n{r['method']} at {r['size_mb']:g} MB: training stalls {stall:.4f} s = "
                f"{stall / sync:.3f}x the synchronous backup ({sync:.4f} s); the background write takes "
                f"{r['writer_s']:.4f} s."
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in results):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["size_mb"])
        axes.plot(
            [r["size_mb"] for r in rows],
            [statistics.median(r["backup_s"]) for r in rows],
            marker="o",
            label=method,
        )
    axes.set(xscale="log", yscale="log", xlabel="state (MB)", ylabel="backup time (s, median)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 200], help="state sizes in MB")
    parser.add_argument("--repeats", type=int, default=5, help="backups measured per method and size")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--layers", type=int, default=1, help="square dense layers the state is split into")
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where files are written"
    )
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--plot", type=Path, help="draw time against size here (PNG)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, size = args.child
        print(json.dumps(child(method, float(size), args.repeats, args.dir, args.layers)))
        return 0
    methods = ["floor", *(m for m in args.methods if m != "floor")]
    results = []
    for size in args.sizes:
        for method in methods:
            result = run_one(method, size, args.repeats, args.dir, args.layers)
            results.append({"method": method, "size_mb": size, **result})
            print(f"{method} at {size:g} MB: {statistics.median(result['backup_s']):.4f} s", file=sys.stderr)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
