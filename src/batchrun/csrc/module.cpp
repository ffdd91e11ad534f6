// The Python module of batchrun's CPU extension (batchrun.cpu_ext): the cascade attention op and the fused
// layer ops, each defined in its own source.
#include <torch/extension.h>

void attention_part_(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& o,
                     at::Tensor& lse, const at::Tensor& q_start, const at::Tensor& q_len,
                     const at::Tensor& kv_indices, const at::Tensor& kv_indptr, bool is_causal, bool is_merge,
                     double sm_scale);
at::Tensor add_rms_norm_(at::Tensor& hidden, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                         double eps);
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_part_", &attention_part_, "one cascade attention part over the KV slot pool, in place");
  m.def("add_rms_norm_", &add_rms_norm_, "hidden += delta (if given) in place; returns rms_norm(hidden) * weight",
        pybind11::arg("hidden"), pybind11::arg("delta"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rope_", &rope_, "RoPE in place on x [N, heads, D] with cos/sin rows [N, D]");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of gate_up [N, 2I] rows");
}
