"""Where a Keras ``fit`` stands, and how a resumed one starts where the backup was made.

Keras (3 and tf_keras) has no initial-step mechanism that reads the data from the right place,
and Keras 3 without a strategy builds the model only in its first step. :class:`Resume` therefore

- tells ``fit`` the first epoch (through the flavour) and clears it once that epoch began;
- restores at once when the model is built (or can be built from the input's structure), else at
  the first step, before it trains, through a stand-in for the model's train function;
- inside an epoch, has that stand-in read the batches trained before the backup without training
  on them, and put back the compiled metrics' sums that ``fit`` reset for the epoch; where one
  iterator is read across epochs (tf_keras arrays), it first reads the earlier epochs again;
- hides those reads from every callback: no ``on_train_batch_begin/end`` is called for them, so
  batch indices continue from the backup's, as in the uninterrupted run (Lightning fires nothing
  for the batches it skips either);
- turns the optimizer's counters into the :class:`Position` of each boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras

from keras_impl import _private, flavour, pipeline
from keras_impl.state import KerasTrainingState
from unified_backup.manifest import Manifest
from unified_backup.state import Position

log = logging.getLogger(__name__)


class Resume:
    """The position of one ``fit`` of ``state.model``, and the steps that resume it."""

    def __init__(
        self, state: KerasTrainingState, fit_input: pipeline.InputPipeline, callback_list: Any = None
    ) -> None:
        self.state = state
        self.callback_list = callback_list  # the fit's CallbackList, whose batch hooks hide skipped batches
        self.model = state.model
        self.flavour = state.flavour
        self.input = fit_input
        self.epoch = 0
        self._epoch_start = (0, 0)  # (optimizer steps, batches) when the current epoch began
        self._resumed_start: tuple[int, int] | None = None  # the resumed epoch's, until it begins

    def restore_now(self, opened: Manifest | None) -> bool:
        """Whether the backup ``opened`` can be restored before ``fit`` draws its first epoch's order.

        Builds the model from the input's structure where ``fit`` would only build it in its first step.
        """
        if opened is not None and not self.model.built and self.input.element_spec is not None:
            self.flavour.build_from_spec(self.model, self.input.element_spec)
        return self.model.built or opened is None

    def defer(self, opened: Manifest, restore: Callable[[Any], int]) -> None:
        """Start ``fit`` at the backup's epoch, and ``restore(iterator)`` at its first step."""
        self.flavour.set_initial_epoch(self.model, opened.epoch)
        self.epoch = opened.epoch
        _FirstSteps(self.model, restore, hooks=self.callback_list)

    def build(self, iterator: Any = None) -> None:
        """Build what the first step would build, so that the backup can be checked and loaded."""
        if iterator is not None and not self.model.built:
            self.flavour.build_from_spec(self.model, iterator.element_spec)
        model = self.model
        if model.built:
            with model.distribute_strategy.scope():
                self.flavour.build_optimizer(model)

    def restored(self, manifest: Manifest | None, iterator: Any = None) -> int:
        """Start ``fit`` where ``manifest`` was made; return the batches its epoch is to skip.

        ``iterator``: the first step's (the epoch began already), or None in ``on_train_begin``.
        """
        if manifest is None:
            return 0
        skip = self.state.restored_batch_in_epoch  # batches, not optimizer steps (gradient accumulation)
        steps, batches = self.state.position
        start = (steps - manifest.step_in_epoch, batches - skip)
        if iterator is None:
            self.flavour.set_initial_epoch(self.model, manifest.epoch)
            self.epoch, self._resumed_start = manifest.epoch, start
        else:
            self._epoch_start = start
        seeds = self.state.restored_tf_seed, _private.tf_global_seed()
        log.log(*self.input.resume_message(manifest.epoch, skip, *seeds))
        problem = self.flavour.rng_problem(self.model)
        if problem is not None:
            log.warning("Resuming at epoch %d, but %s", manifest.epoch, problem)
        lead = self.input.batches_before(manifest.epoch, *seeds) if iterator is None else 0
        if lead:
            log.info(
                "Reading the %d batch(es) of the epochs before epoch %d again, without training, so that the "
                "input (one iterator across epochs) continues where the interrupted run's stood.",
                lead,
                manifest.epoch,
            )
        if (skip or lead) and iterator is None:
            _FirstSteps(
                self.model, lambda it: self._continue_epoch(manifest, skip, it), lead, self.callback_list
            )
        elif skip:
            self._continue_epoch(manifest, skip, iterator)
        return skip

    def _continue_epoch(self, manifest: Manifest, skip: int, iterator: Any) -> int:
        """At the resumed epoch's first step, put back the metrics' sums, so that the epoch's mean loss
        counts the batches trained before the backup; return how many batches to skip."""
        if not skip:
            return 0
        if not self.flavour.compiled_metrics_built(self.model):  # fit builds them in this step
            self.flavour.build_from_spec(self.model, iterator.element_spec)
        if not self.state.restore_metrics():
            log.warning(
                "The metrics of the backup do not match the compiled metrics; the metrics that fit reports "
                "for epoch %d cover only its batches after the resume.",
                manifest.epoch,
            )
        return skip

    def epoch_begin(self, epoch: int) -> None:
        self.flavour.set_initial_epoch(self.model, None)
        resumed = self._resumed_start is not None and epoch == self.epoch
        self._epoch_start = self._resumed_start if resumed else self.state.position  # type: ignore[assignment]
        self._resumed_start, self.epoch = None, epoch

    def epoch_end(self) -> None:
        """After the epoch's boundary: note the host generators as the next epoch's input will find them.

        tf_keras makes the next epoch's iterator (whose prefetching may draw the order) before
        ``on_epoch_begin``; nothing draws between an epoch's end and the next one's iterator.
        """
        self.state.note_epoch_start()

    def position(self, ended: bool, steps_per_epoch: int | None) -> Position:
        """Where training stands after a batch, or at the epoch's end (``ended``; maybe stopped inside it)."""
        step, batches = self.state.position
        in_steps, in_batches = step - self._epoch_start[0], batches - self._epoch_start[1]
        total = steps_per_epoch
        if (total and in_batches >= total) or (ended and not (self.model.stop_training and total)):
            return Position.epoch_end(self.epoch + 1, step)  # the epoch's last batch
        return Position(self.epoch, in_steps, step, in_batches)


def clear(model: keras.Model) -> None:
    """Leave nothing of a resume on the model (after ``fit``, or before one that follows a failed one)."""
    flavour.of(model).set_initial_epoch(model, None)
    _FirstSteps.remove(model)


class _FirstSteps:
    """Stands in for the model's train function during the first steps of a resumed ``fit``.

    Its first call reads ``lead`` batches without counting them (the earlier epochs of an iterator
    read across epochs), then runs ``prepare(iterator)`` (a restore that had to wait for the model to be
    built, or the metrics' sums put back after ``fit`` reset them for the resumed epoch), which
    returns how many batches the backup had already trained in this epoch. ``fit`` calls the train
    function once per ``steps_per_execution`` batches; each call here then reads that many batches
    without training and returns the (reset) metrics, until the count is reached and the model's
    own function is put back. If ``steps_per_execution`` changed since the backup so that the count
    does not divide, the straddling call reads the rest and then trains; the epoch's input then
    ends inside its last call, so every batch is still trained once.

    With ``hooks`` (the fit's ``CallbackList``), the calls that only read batches fire no batch hook
    (see :class:`_HiddenBatches`); a straddling call fires them, as it trains. An error raised
    inside a call (a refused restore, Ctrl-C during the skip) puts the train function and the
    hooks back before it propagates.
    """

    def __init__(
        self, model: keras.Model, prepare: Callable[[Any], int], lead: int = 0, hooks: Any = None
    ) -> None:
        self.model = model
        self.hooks = _HiddenBatches(hooks) if hooks is not None else None
        self.lead = lead
        original = _private.train_function(model)
        assert original is not None, "fit makes the train function before on_train_begin"
        self.original = original
        self.prepare = prepare
        self.remaining = 0
        self.iterator: Any = None
        _private.set_train_function(model, self)

    def __call__(self, iterator: Any) -> Any:
        try:
            return self._call(iterator)
        except BaseException:  # an error, or Ctrl-C during the skip: nothing of the resume stays behind
            _FirstSteps.remove(self.model)
            raise

    def _call(self, iterator: Any) -> Any:
        if self.iterator is None:
            self.iterator = iterator
            for _ in range(self.lead):
                next(iterator)
            self.remaining = self.prepare(iterator)
        if self.remaining <= 0 or iterator is not self.iterator:  # done, or a later epoch or fit
            self._done(trains=True)
            return self.original(iterator)
        per_call = self.model.steps_per_execution  # tf_keras: a (maybe mirrored) variable
        per_call = int(per_call.numpy() if hasattr(per_call, "numpy") else per_call)
        skipped = min(per_call, self.remaining)
        for _ in range(skipped):
            next(iterator)
        self.remaining -= skipped
        if skipped < per_call:  # the rest of this call's batches are trained
            self._done(trains=True)
            return self._train_part(iterator, per_call - skipped)
        if self.hooks is not None:
            self.hooks.hide(last=self.remaining <= 0)
        if self.remaining <= 0:
            self._done(trains=False)
        return self.model.get_metrics_result()

    def _done(self, trains: bool) -> None:
        """Put the model's own train function back; if this call trains, fire its held batch begin."""
        _private.set_train_function(self.model, self.original)
        if trains and self.hooks is not None:
            self.hooks.show()

    def _train_part(self, iterator: Any, batches: int) -> Any:
        """Train the next ``batches`` (fewer than ``steps_per_execution``) in one call.

        Keras 3 reads until its input ends inside a call; tf_keras's multi-step function would raise
        at the input's end and end ``fit`` early, so its step count is set for this call, as tf_keras
        does itself for an epoch's last, shorter call.
        """
        count = self.model.steps_per_execution
        if not hasattr(count, "assign"):  # Keras 3
            return self.original(iterator)
        original = int(count.numpy())
        count.assign(batches)
        try:
            return self.original(iterator)
        finally:
            count.assign(original)

    @staticmethod
    def remove(model: keras.Model) -> None:
        """Put the model's own train function and its fit's batch hooks back, if a stand-in is there."""
        stand_in = _private.train_function(model)
        if isinstance(stand_in, _FirstSteps):
            _private.set_train_function(model, stand_in.original)
            if stand_in.hooks is not None:
                stand_in.hooks.release()


class _HiddenBatches:
    """Keeps the batches a resumed ``fit`` only reads again out of every callback's sight.

    ``fit`` calls ``on_train_batch_begin``, the train function, then ``on_train_batch_end``, once per
    ``steps_per_execution`` batches. Each begin is held until the train function (the stand-in)
    knows whether its call trains: if it does, the begin is called then, before the training, and
    the hooks go back to the list; if it only reads, neither its begin nor its end is ever called.
    """

    def __init__(self, callback_list: Any) -> None:
        self.callback_list = callback_list
        self.held: tuple[int, Any] | None = None  # the begin of the call in progress
        self.hide_end = False
        self.last = False  # the hidden end is the last one: release after it
        self.hooks = _private.HeldTrainBatchHooks(callback_list, self._begin, self._end)

    def _begin(self, batch: int, logs: Any = None) -> None:
        self.held = (batch, logs)

    def _end(self, batch: int, logs: Any = None) -> None:
        if not self.hide_end:  # not reached: a call that trains releases the hooks before its end
            self.hooks.own_end(batch, logs)
            return
        self.hide_end = False
        if self.last:
            self.release()

    def hide(self, last: bool) -> None:
        """The call in progress only reads: drop its begin and its end."""
        self.held, self.hide_end, self.last = None, True, last

    def show(self) -> None:
        """The call in progress trains: call its begin now and stop hiding."""
        held, self.held = self.held, None
        self.release()
        if held is not None:
            self.hooks.own_begin(*held)

    def release(self) -> None:
        self.hooks.release()
