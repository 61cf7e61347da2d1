#!/usr/bin/env bash
# mypy over the whole ccld_trt namespace package (its source roots are in pyproject's mypy_path), with the
# TensorRT code checked against NVIDIA's published type stubs and the TensorRT-RTX code against stubs generated
# from the installed tensorrt_rtx.
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
# TensorRT-RTX ships no stubs: generate them from the installed module (its pybind11 signatures) when it is
# there, with the same add_scale_nd patch.
if [ ! -f build/typings/tensorrt_rtx/__init__.pyi ] && "$PY" -c "import tensorrt_rtx" 2>/dev/null; then
  "$PY" -c "from mypy.stubgen import main; main()" -q -p tensorrt_rtx -p tensorrt_rtx_bindings -o build/typings
  sed -i -E 's/, channel_axis: typing.SupportsInt\) -> IScaleLayer/, channel_axis: typing.SupportsInt = ...) -> IScaleLayer/' \
    build/typings/tensorrt_rtx_bindings/tensorrt_rtx.pyi
fi
exec "$PY" -m mypy export engines runtime benchmarks
