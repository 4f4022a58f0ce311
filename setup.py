"""Build of the optional C kernels; all other metadata is in pyproject.toml.

``dynwire.layers._aggkernel`` holds the fused CPU kernels of the aggregation (a plain C file,
OpenMP, no PyTorch headers). It is optional: where no C compiler with OpenMP is found the
package installs without it and the plain PyTorch kernels are used. In a source checkout,
``make kernels`` (``python setup.py build_ext --inplace``) builds it next to its Python code.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    args, link = ["/O2", "/openmp"], []
elif sys.platform == "darwin":  # Apple clang needs libomp (brew) and -Xpreprocessor; usually absent
    args, link = ["-O3", "-Xpreprocessor", "-fopenmp"], ["-lomp"]
else:
    args, link = ["-O3", "-fopenmp", "-std=c11"], ["-fopenmp", "-lm"]

setup(
    ext_modules=[
        Extension(
            "dynwire.layers._aggkernel",
            sources=["src/dynwire/layers/_aggkernel.c"],
            extra_compile_args=args,
            extra_link_args=link,
            optional=True,
        )
    ]
)
