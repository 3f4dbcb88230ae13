// The operators a direct decode step calls (lucidlm/direct_decode.py), bound straight to Python as well.
//
// Why: through torch.ops each call passes PyTorch's dispatcher, which parses its arguments against
// the operator's schema and boxes them: ~1 us more than a plain pybind11 call for the same C++
// function, and a SmolLM2 step makes ~270 such calls. The functions are the same ones (kernels.h):
// same arithmetic, same results. torch.compile cannot trace these bindings; the models' forward
// (which it traces) keeps calling the registered operators.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_dot_matmul", &lucidlm_kernels::int8_dot_matmul);
  m.def("decode_attention", &lucidlm_kernels::decode_attention);
  m.def("rms_norm", &lucidlm_kernels::rms_norm);
  m.def("gated_activation", &lucidlm_kernels::gated_activation);
  m.def("rope_and_store", &lucidlm_kernels::rope_and_store);
}
