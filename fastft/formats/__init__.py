"""What fastft's data formats and option domains are: the 4-bit tables and blocking (nf4), the integer grids of
fake quantization (qat), the bottleneck activations, the LoRA dropout threshold. Both the specification
(fastft/reference/) and the run-time code (ops, public functions, modules) import these definitions, so neither
depends on the other; this package imports nothing else of fastft.
"""
