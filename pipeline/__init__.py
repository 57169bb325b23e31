"""A distributed, ImageNet-scale knowledge-distillation pipeline."""

from pipeline.malloc import keep_freed_memory
from pipeline.threads import set_openmp_defaults

__version__ = "0.1.0"

# Before any module of the package imports torch: libgomp reads its wait policy when it loads.
set_openmp_defaults()
# CPU steps reuse freed memory instead of faulting fresh pages in (pipeline/malloc.py).
keep_freed_memory()
