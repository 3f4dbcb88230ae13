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
  // The GIL is released while a kernel runs, as PyTorch's own operators do: another Python thread (the
  // server's event loop, beside its engine thread) gets on meanwhile.
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("int8_dot_matmul", &lucidlm_kernels::int8_dot_matmul, release());
  m.def("decode_attention", &lucidlm_kernels::decode_attention, release());
  m.def("rms_norm", &lucidlm_kernels::rms_norm, release());
  m.def("gated_activation", &lucidlm_kernels::gated_activation, release());
  m.def("rope_and_store", &lucidlm_kernels::rope_and_store, release());
}
