#!/usr/bin/env bash
# mypy over the whole ccld_trt namespace package (its source roots are in pyproject's mypy_path), with the
# TensorRT code checked against NVIDIA's published type stubs.
#
# tensorrt-stubs pins the real tensorrt package (which cannot be installed here) and its .pyi has a few syntax
# errors (parameters named `in`), so the wheel is unpacked and patched under build/typings instead of installed.
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
exec "$PY" -m mypy export engines runtime benchmarks
