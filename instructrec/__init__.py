"""instructrec: recommendation as instruction following (InstructRec, arXiv 2305.07001).

The core package holds the method shared by training and serving: the instruction
format, the template table and its selection, model loading and the likelihood ranker.
The layers above it live beside it and are never imported by it: :mod:`instructrec.training`,
:mod:`instructrec.service` and :mod:`instructrec.bench`.
"""

__version__ = "0.1.0"
