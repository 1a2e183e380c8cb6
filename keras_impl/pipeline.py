"""Which input pipelines a resumed ``fit`` reads in exactly the order of the uninterrupted run.

A resume restores the random-number generators (see :mod:`keras_impl.rng`) and, inside an epoch,
skips the batches trained before the backup by reading them again. That reproduces the data order
when each epoch's order is drawn afresh from those generators, or is the same in every epoch:

- numpy arrays or tensors, ``shuffle=False``; with ``shuffle=True`` (or ``"batch"``) only when
  TensorFlow's global seed is the same as at the backup: Keras then draws the same order each epoch;
- ``keras.utils.PyDataset`` read by one worker, drawing from Python's ``random`` or NumPy's global
  generator (``fit(shuffle=True)``, ``on_epoch_begin``, ``__getitem__``), with no ``on_epoch_end``;
- ``tf.data.Dataset`` that yields the same elements in every iteration (no
  ``reshuffle_each_iteration``, no ``tf.random.Generator``; unseeded ops need the same global seed).

tf_keras reads numpy arrays through one iterator across all epochs (each epoch's order is the
next draw of one shuffle): a resumed ``fit`` reads the epochs before the resumed one again, without
training, so that the iterator stands where the uninterrupted run's stood. Its exact inputs are

- numpy arrays or tensors (any ``shuffle``; shuffled only with the same TensorFlow global seed);
- a ``tf_keras.utils.Sequence`` read by one worker (``fit(shuffle=True)`` draws its batch order from
  Python's ``random``), with no ``on_epoch_end``;
- a ``tf.data.Dataset``, as for Keras 3.

Nothing can position the others (``fit(steps_per_epoch=...)`` reading one dataset iterator across
epochs, Python generators, parallel workers, ...): the callback warns once at restore time.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from keras_impl import _private

# Ops that draw from a tf.random.Generator (a state that prefetching advances ahead of training).
_STATEFUL_GENERATOR_OPS = (
    "StatefulUniform",
    "StatefulStandardNormal",
    "StatefulTruncatedNormal",
    "StatefulRandomBinomial",
    "RngSkip",
    "RngReadAndSkip",
    "NonDeterministicInts",
)
# Legacy random ops: seeded by the global seed at trace time, they restart with every iterator.
_LEGACY_RANDOM_OPS = ("Random", "TruncatedNormal", "Multinomial", "ParameterizedTruncatedNormal")


@dataclasses.dataclass(frozen=True)
class InputPipeline:
    """What ``fit`` reads, as far as resuming goes.

    Attributes:
        description: what the input is, for messages.
        problem: why a resumed run reads another order, or None.
        seeded_by_tf: its order is drawn by ops seeded from TensorFlow's global seed (exact only
            when that seed is the same as at the backup).
        element_spec: the structure of one batch (to build a model before its first step), if known.
        epoch_batches: for one iterator read across epochs whose position depends on the epochs
            before (tf_keras arrays): the batches each earlier epoch read, which a resumed ``fit``
            reads again before its first step; None when every epoch starts afresh.
        first_epoch: the ``initial_epoch`` that ``fit`` was called with (its iterator starts there).
    """

    description: str
    problem: str | None = None
    seeded_by_tf: bool = False
    element_spec: Any = dataclasses.field(default=None, compare=False, repr=False)
    epoch_batches: int | None = None
    first_epoch: int = 0
    advice: str = ""  # what to feed instead for an exact resume (EXACT_INPUTS by default)

    def batches_before(self, epoch: int, backup_seed: int | None, seed: int | None) -> int:
        """The batches a resumed ``fit`` reads again before it trains ``epoch`` (0 where that cannot help)."""
        if not self.epoch_batches or self.resume_problem(backup_seed, seed) is not None:
            return 0
        return max(0, epoch - self.first_epoch) * self.epoch_batches

    def resume_problem(self, backup_seed: int | None, seed: int | None) -> str | None:
        """Why resuming this input reads another order than the uninterrupted run, or None."""
        if self.problem is not None or not self.seeded_by_tf:
            return self.problem
        drawn = "its order is drawn by ops seeded from TensorFlow's global seed"
        if seed is None:
            return f"{drawn}, and no global seed is set, so every run (and every epoch) draws another order."
        if seed != backup_seed:
            return f"{drawn}, which was {backup_seed} when the backup was made and is {seed} now."
        return None

    def resume_message(
        self, epoch: int, skipped: int, backup_seed: int | None, seed: int | None
    ) -> tuple[int, str]:
        """The logging level and text that say, once per restore, whether the data order is reproduced."""
        problem = self.resume_problem(backup_seed, seed)
        if problem is None:
            if not skipped:
                return logging.DEBUG, f"Resuming at the start of epoch {epoch} (input: {self.description})."
            return logging.INFO, (
                f"Resuming inside epoch {epoch}: its first {skipped} batch(es), trained before the backup, "
                f"are read again and skipped (input: {self.description})."
            )
        if skipped:
            return logging.WARNING, (
                f"Resuming inside epoch {epoch}: its first {skipped} batch(es), trained before the backup, "
                f"are read again and skipped, but this input ({self.description}) does not reproduce its "
                f"order: {problem} Some samples of epoch {epoch} may be trained twice and others not at all; "
                f"the run will not end identical to an uninterrupted one. {self.advice or EXACT_INPUTS}"
            )
        return logging.WARNING, (
            f"Resuming at the start of epoch {epoch}, but this input ({self.description}) does not reproduce "
            f"its order: {problem} Each epoch still reads every batch once, in another order than an "
            f"uninterrupted run, so the run will not end identical to it. {self.advice or EXACT_INPUTS}"
        )


EXACT_INPUTS = (
    "For an exact resume, feed numpy arrays (with shuffle=True, seed every run alike with "
    "keras.utils.set_random_seed), a keras.utils.PyDataset (tf_keras: a Sequence) read by one "
    "worker that draws its order in on_epoch_begin (tf_keras: fit(shuffle=True)), or a tf.data.Dataset "
    "that does not reshuffle (README: 'Exact resume')."
)

_DATASET_CREATOR = InputPipeline(  # tf_keras under ParameterServerStrategy (Keras 3 has neither)
    "a DatasetCreator (ParameterServerStrategy)",
    "under ParameterServerStrategy each worker reads its own dataset and the workers' steps "
    "interleave at random, so no input is read in the same order twice; two uninterrupted runs "
    "differ as well.",
    advice="An exact resume under ParameterServerStrategy needs every epoch to read the same "
    "batches whatever worker runs them (README: 'Distributed training').",
)

UNKNOWN = InputPipeline(
    "an input that could not be identified",
    "BackupAndRestore found no data adapter in fit's call stack (another Keras version, or fit "
    "called in an unusual way), so it cannot tell whether the order can be reproduced.",
)


def inspect_fit_input() -> InputPipeline:
    """Describe the input of the ``fit`` that is running; call it from a callback hook of that ``fit``."""
    epoch_iterator = _private.fit_epoch_iterator(max_depth=14)
    if epoch_iterator is None:
        return UNKNOWN
    try:
        found = describe(epoch_iterator)
    except Exception:  # noqa: BLE001 - private structures moved: say so, do not fail the fit
        return UNKNOWN
    return dataclasses.replace(found, element_spec=_private.element_spec(epoch_iterator))


def describe(epoch_iterator: Any) -> InputPipeline:
    """Classify a Keras ``EpochIterator`` by its data adapter."""
    adapter = epoch_iterator.data_adapter
    kind = type(adapter).__name__
    steps_per_epoch = getattr(epoch_iterator, "steps_per_epoch", None)
    if steps_per_epoch and steps_per_epoch != adapter.num_batches:
        return InputPipeline(
            f"{kind} with steps_per_epoch={steps_per_epoch}",
            "fit(steps_per_epoch=...) reads one iterator across epochs, and a resumed fit starts a new one "
            "at the beginning of the data.",
        )
    if kind == "ArrayDataAdapter":
        shuffle = _private.array_shuffle(adapter)
        if not shuffle:
            return InputPipeline("arrays with shuffle=False")
        return InputPipeline(f"arrays with shuffle={shuffle!r}", seeded_by_tf=True)
    if kind == "PyDatasetAdapter":
        dataset = adapter.py_dataset
        name = f"a PyDataset ({type(dataset).__name__})"
        if adapter.enqueuer is not None:
            return InputPipeline(
                name,
                f"it is read by {dataset.workers} worker(s) (use_multiprocessing="
                f"{dataset.use_multiprocessing}) in parallel, so the order of their random draws cannot be "
                "replayed; use workers=1.",
            )
        if _overrides(dataset, "on_epoch_end"):
            return InputPipeline(
                name,
                "it defines on_epoch_end(), and what that changes in the dataset object between epochs (e.g. "
                "a shuffled index) is not in the backup; draw the order in on_epoch_begin() instead.",
            )
        return InputPipeline(name)
    if kind == "TFDatasetAdapter":
        return _describe_tf_dataset(_private.adapted_dataset(adapter))
    if kind == "GeneratorDataAdapter":
        return InputPipeline(
            "a Python generator",
            "a generator is read once across all epochs and cannot be rewound or positioned; the resumed "
            "fit reads a new generator from its start.",
        )
    return InputPipeline(f"{kind} input", f"BackupAndRestore cannot position {kind} input.")


def _overrides(dataset: Any, name: str, base: Any = None) -> bool:
    """Whether the dataset's class defines ``name`` itself, rather than inheriting ``base``'s (PyDataset)."""
    if base is None:
        from keras.utils import PyDataset

        base = PyDataset
    return getattr(type(dataset), name) is not getattr(base, name)


def inspect_tf_keras_fit_input() -> InputPipeline:
    """Describe the input of the tf_keras ``fit`` that is running; call it from ``on_train_begin``."""
    handler, fit_args = _private.fit_data_handler()
    if handler is None:
        return UNKNOWN
    try:
        found = describe_tf_keras(handler, fit_args)
    except Exception:  # noqa: BLE001 - private structures moved: say so, do not fail the fit
        return UNKNOWN
    return dataclasses.replace(found, element_spec=_private.handler_element_spec(handler))


def describe_tf_keras(handler: Any, fit_args: dict[str, Any]) -> InputPipeline:
    """Classify a tf_keras ``DataHandler`` by its data adapter."""
    adapter = _private.handler_adapter(handler)
    kind = type(adapter).__name__
    steps = handler.inferred_steps
    if kind in ("TensorLikeDataAdapter", "GenericArrayLikeDataAdapter"):
        shuffle = _private.tensor_like_shuffle(adapter)
        partial = bool(steps) and steps != adapter.get_size()  # fit(steps_per_epoch=...) below the size
        replay = steps if (shuffle or partial) else None
        return InputPipeline(
            f"arrays with shuffle={shuffle!r}" + (f", steps_per_epoch={steps}" if partial else ""),
            seeded_by_tf=bool(shuffle),
            epoch_batches=replay,
            first_epoch=_private.handler_first_epoch(handler),
        )
    if kind == "KerasSequenceAdapter":
        sequence, shuffled = _private.sequence_of(adapter)
        name = f"a tf_keras Sequence ({type(sequence).__name__}, shuffle={shuffled})"
        workers, processes = fit_args.get("workers", 1), fit_args.get("use_multiprocessing", False)
        if workers > 1 or (workers > 0 and processes):
            return InputPipeline(
                name,
                f"it is read by {workers} worker(s) (use_multiprocessing={processes}) in parallel, so the "
                "order of their random draws cannot be replayed; use workers=1.",
            )
        from tf_keras.utils import Sequence

        if _overrides(sequence, "on_epoch_end", Sequence):
            return InputPipeline(
                name,
                "it defines on_epoch_end(), and what that changes in the Sequence between epochs (e.g. a "
                "shuffled index) is not in the backup; let fit(shuffle=True) shuffle the batch order "
                "instead.",
            )
        return InputPipeline(name)
    if kind == "DatasetAdapter":
        if not adapter.should_recreate_iterator():
            return InputPipeline(
                f"a tf.data.Dataset with steps_per_epoch={steps}",
                "fit(steps_per_epoch=...) reads one iterator across epochs, and a resumed fit starts a new "
                "one at the beginning of the data.",
            )
        return _describe_tf_dataset(_private.tf_keras_dataset(adapter))
    if kind == "DatasetCreatorAdapter":
        return _DATASET_CREATOR
    if kind == "GeneratorDataAdapter":
        return InputPipeline(
            "a Python generator",
            "a generator is read once across all epochs and cannot be rewound or positioned; the resumed "
            "fit reads a new generator from its start.",
        )
    return InputPipeline(f"{kind} input", f"BackupAndRestore cannot position {kind} input.")


def _describe_tf_dataset(dataset: Any) -> InputPipeline:
    """Walk a ``tf.data.Dataset``'s inputs (without serialising it) for reshuffling and random ops."""
    description = "a tf.data.Dataset"
    if _private.dataset_inputs(dataset) is None:  # e.g. a DistributedDataset made by the user
        return InputPipeline(description, f"{type(dataset).__name__} cannot be inspected for random ops.")
    seeded_by_tf = False
    stack, seen = [dataset], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if _private.reshuffles_each_iteration(node):
            return InputPipeline(
                description,
                "it reshuffles in every iteration (shuffle(..., reshuffle_each_iteration=True)), from a seed "
                "generator inside the dataset that cannot be saved; use reshuffle_each_iteration=False or a "
                "PyDataset.",
            )
        for op_type in _function_op_types(node):
            if op_type.startswith(_STATEFUL_GENERATOR_OPS):
                return InputPipeline(
                    description,
                    f"a dataset function draws from a tf.random.Generator ({op_type}), whose draws cannot be "
                    "replayed for the skipped batches.",
                )
            if op_type.startswith(_LEGACY_RANDOM_OPS):
                seeded_by_tf = True
        stack.extend(_private.dataset_inputs(node) or ())
    return InputPipeline(description, seeded_by_tf=seeded_by_tf)


def _function_op_types(node: Any) -> list[str]:
    """Op types of the functions a dataset node applies (map, filter, flat_map, ...)."""
    types: list[str] = []
    for value in vars(node).values():
        graph = getattr(getattr(value, "function", None), "graph", None)
        if graph is not None and hasattr(graph, "get_operations"):
            types.extend(op.type for op in graph.get_operations())
    return types
