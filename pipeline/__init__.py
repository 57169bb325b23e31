"""A distributed, ImageNet-scale knowledge-distillation pipeline."""

from pipeline.threads import set_openmp_defaults

__version__ = "0.1.0"

# Before any module of the package imports torch: libgomp reads its wait policy when it loads.
set_openmp_defaults()
