"""Repository-wide pytest setup, loaded before any package's conftest in a whole-repo run.

Triton's CPU interpreter is chosen when triton is first imported. Importing ds_core already imports
torch._dynamo (``torch.compiler.disable`` on the sparse MLP's kernel path), which imports triton, so
a package conftest that imports ds-models before ds-core's conftest runs would lock in the compiled
mode and every interpreted kernel test would fail. Setting the variable here, first, keeps the
whole-repo run equal to the per-package runs. ``TRITON_INTERPRET=0`` in the environment keeps the
real GPU kernels on a CUDA machine.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
