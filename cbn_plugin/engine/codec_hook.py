"""``CheckpointCodecHook``: checkpoints that plain ``torch.load`` (``weights_only=True``) reads.

The encoding itself is :mod:`.codec`; see ``docs/checkpoints.md``.
"""
from __future__ import annotations

from .codec import decode_checkpoint, encode_checkpoint
from .concern import CheckpointConcernHook


class CheckpointCodecHook(CheckpointConcernHook):
    """Encode checkpoints for ``torch.load``'s ``weights_only=True``; decode them on load.

    ``before_save_checkpoint`` rewrites what MMEngine 0.10.7 pickles and
    ``weights_only`` refuses (``HistoryBuffer``, numpy arrays, scalars and
    dtypes) into tagged plain data (:func:`.encode_checkpoint`);
    ``after_load_checkpoint`` rewrites it back (:func:`.decode_checkpoint`),
    before the message hub, optimizer and schedulers read the checkpoint.

    Args:
        encode (bool): Encode saved checkpoints (config switch
            ``weights_only_checkpoints``). Decoding is always on: it only
            changes what was encoded. Defaults to True.

    Priority ``'LOWEST'``: it encodes after every other hook (the RNG and
    rank-state hooks, ``'VERY_LOW'``) has added its part.
    """

    priority = 'LOWEST'
    concern = 'codec'

    def __init__(self, encode: bool = True) -> None:
        if not isinstance(encode, bool):
            raise ValueError(f'CheckpointCodecHook encode must be True or False, got {encode!r}')
        self.encode = encode

    def before_run(self, runner) -> None:
        self.claim(runner)  # says so when another one comes first

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.encode and self.acts(runner):
            encode_checkpoint(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.acts(runner):
            decode_checkpoint(checkpoint)
