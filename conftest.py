"""Repository-wide pytest setup, loaded before any package's conftest in a whole-repo run.

Triton's CPU interpreter is chosen when triton is first imported. Importing ds_core already imports
torch._dynamo (``torch.compiler.disable`` on the sparse MLP's kernel path), which imports triton, so
a package conftest that imports ds-models before ds-core's conftest runs would lock in the compiled
mode and every interpreted kernel test would fail. Setting the variable here, first, keeps the
whole-repo run equal to the per-package runs. On a machine with a CUDA GPU the real kernels run
(the interpreter is chosen only where there is none); an explicit ``TRITON_INTERPRET`` wins.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch  # importing torch does not import triton

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
