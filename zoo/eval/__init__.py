"""Evaluation: one :class:`~zoo.eval.protocol.Protocol` per original protocol, one runner for all."""

#: Samples per batch unless told otherwise. Detectors pad each batch to its largest image, and
#: the padding changes their outputs a little (as in the originals), so detection numbers are
#: only comparable at the same batch size; the RelZoo-mini numbers were measured at this one.
#: Here rather than in the runner so that the CLI shows it without importing torch.
DEFAULT_BATCH_SIZE = 8
