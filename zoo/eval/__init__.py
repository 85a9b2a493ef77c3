"""Evaluation: one :class:`~zoo.eval.protocol.Protocol` per original protocol, one runner for all."""
