# Sourced by the llama.cpp build scripts: sets $args, the CMake flags for this CPU.
# Never -march=native: on the Intel AMX VMs a native build dies with "Illegal instruction" as soon as
# a Q4_1 prompt of more than one token runs through its AMX path, so AMX is always off and the SIMD
# level is picked from this CPU's flags instead:
#   avx512f + avx512_vnni (+ avx512_bf16, avx512_vbmi)  -> AVX-512 build
#   avx2 + fma + f16c                                  -> AVX2 build
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON"
has avx && args+=" -DGGML_AVX=ON"
has avx2 && args+=" -DGGML_AVX2=ON"
has fma && args+=" -DGGML_FMA=ON"
has f16c && args+=" -DGGML_F16C=ON"
has bmi2 && args+=" -DGGML_BMI2=ON"
has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
if has avx512f; then
  args+=" -DGGML_AVX512=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
  has avx512vbmi && args+=" -DGGML_AVX512_VBMI=ON"
fi
