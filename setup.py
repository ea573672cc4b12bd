"""Build of pyvm's Cython extensions; all metadata lives in pyproject.toml.

``pyvm._fastpath`` (dirty tracking, page scans), ``pyvm._pagestream`` (the migration
stream's page records) and ``pyvm._xbzrle`` (XBZRLE page deltas) are always built; they
share ``pyvm/_kernels.h``.  ``pyvm._delivery`` is the native interrupt and exception
delivery of the vCPUs, ``pyvm._portio`` their IN/OUT hooks, ``pyvm._pic`` the 8259A
pair's hot paths, ``pyvm._pit`` the 8254's per-tick path, ``pyvm._uart`` the 16550A's
status read and ``pyvm._idle`` the run loop's idle tick (a halted guest's timer
interrupts in one native call).  The rdma transport's libfabric binding is built when
libfabric's headers are installed (Debian: libfabric-dev); without them pyvm works and
``rdma:`` reports what is missing.  Set PYVM_NO_LIBFABRIC=1 to skip it.
"""

import os
import shlex
import subprocess

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def libfabric_flags():
    """(include_dirs, library_dirs) for libfabric, or None when its headers are missing."""
    if os.environ.get("PYVM_NO_LIBFABRIC"):
        return None
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libfabric"], check=True,
                               capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ([], []) if os.path.exists("/usr/include/rdma/fabric.h") else None
    words = shlex.split(flags)
    return ([w[2:] for w in words if w.startswith("-I")],
            [w[2:] for w in words if w.startswith("-L")])


extensions = [
    Extension(
        "pyvm._fastpath",
        ["pyvm/_fastpath.pyx"],
        include_dirs=[numpy.get_include(), "pyvm"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension("pyvm._pagestream", ["pyvm/_pagestream.pyx"], include_dirs=["pyvm"],
              extra_compile_args=["-O3"]),
    Extension("pyvm._xbzrle", ["pyvm/_xbzrle.pyx"], include_dirs=["pyvm"],
              extra_compile_args=["-O3"]),
    Extension("pyvm._delivery", ["pyvm/_delivery.pyx"], extra_compile_args=["-O2"]),
    Extension("pyvm._portio", ["pyvm/_portio.pyx"], extra_compile_args=["-O2"]),
    Extension("pyvm._pic", ["pyvm/_pic.pyx"], extra_compile_args=["-O2"]),
    Extension("pyvm._pit", ["pyvm/_pit.pyx"], extra_compile_args=["-O2"]),
    Extension("pyvm._idle", ["pyvm/_idle.pyx"], extra_compile_args=["-O2"]),
    Extension("pyvm._uart", ["pyvm/_uart.pyx"], extra_compile_args=["-O2"]),
    Extension("pyvm._tlbtrack", ["pyvm/_tlbtrack.pyx"], extra_compile_args=["-O2"]),
]
fabric = libfabric_flags()
if fabric is not None:
    extensions.append(Extension("pyvm.migration.transports._fabric",
                                ["pyvm/migration/transports/_fabric.pyx"],
                                include_dirs=fabric[0], library_dirs=fabric[1],
                                libraries=["fabric"], extra_compile_args=["-O2"]))

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
