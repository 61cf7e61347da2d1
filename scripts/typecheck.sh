#!/usr/bin/env bash
# mypy over the ccld_trt packages, with the TensorRT code checked against NVIDIA's published type stubs.
#
# Two things stand in mypy's way, and this script removes them without touching the venv:
#  - the editable install maps ccld_trt -> runtime/ through an import hook mypy cannot follow, so a tree of
#    symlinks under build/mypy gives it the package as users import it;
#  - tensorrt-stubs pins the real tensorrt package (which cannot be installed here) and its .pyi has a few
#    syntax errors (parameters named `in`), so the wheel is unpacked and patched instead of installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STUBS=tensorrt_stubs-10.13.0.35.1-py3-none-any.whl
if [ ! -f build/typings/tensorrt_bindings/tensorrt.pyi ]; then
  "$PY" -m pip download -q --no-deps tensorrt-stubs==10.13.0.35.1 -d build/wheels
  "$PY" -m zipfile -e "build/wheels/$STUBS" build/typings
  sed -i -E 's/\(self(: IPluginV3)?, in: /(self\1, in_: /; s/, channel_axis: int\) -> IScaleLayer/, channel_axis: int = ...) -> IScaleLayer/' \
    build/typings/tensorrt_bindings/tensorrt.pyi
fi
rm -rf build/mypy && mkdir -p build/mypy/ccld_trt
for f in runtime/*; do ln -s "../../../$f" build/mypy/ccld_trt/; done
for pkg in export engines benchmarks; do ln -s "../../../$pkg" "build/mypy/ccld_trt/$pkg"; done
MYPYPATH=build/mypy:build/typings exec "$PY" -m mypy -p ccld_trt
