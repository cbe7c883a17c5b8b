"""Placeholder while the device-side generator lands: stock behaviour."""

from fairseq.sequence_generator import SequenceGenerator as _Stock


class SequenceGenerator(_Stock):
    pass
