// The Python module of specdec's CPU kernels (built by specdec/kernels/build.py).
#include <torch/extension.h>

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor bias);
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor wsum, torch::Tensor scale,
                          torch::Tensor bias);
torch::Tensor kquant_linear(torch::Tensor x, int64_t qtype, torch::Tensor qs, torch::Tensor sc, torch::Tensor mins,
                            torch::Tensor d, torch::Tensor dmin, torch::Tensor bias);

// --- batch-invariant attention and norms (issue 28, points 0 and 2) ---
torch::Tensor cached_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
// --- end ---

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "int8 weights x bf16 activations (AVX-512 BF16), weights [N/16, K/2, 16, 2]");
  m.def("w8a8_linear", &w8a8_linear,
        "int8 weights x int8 activations quantized per 128-column block (AVX-512 VNNI), weights [N/16, K/4, 16, 4]");
  m.def("kquant_linear", &kquant_linear,
        "GGUF Q4_K / Q6_K weights x int8 activations quantized per 256-column block (AVX-512 VNNI)");
  // --- batch-invariant attention and norms (issue 28, points 0 and 2) ---
  m.def("cached_attention", &cached_attention,
        "a few bf16 queries over a KV cache, each (query, head) in a fixed order whatever the call's shape");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows (the lean draft forward)");
  // --- end ---
}
