// The torch glue of fastattn._C: the Python module entry point and the operator
// library `fastattn_cuda`, whose CUDA kernels the Python ops call for backend="cuda".
//
// The public ops (fastattn::<op>_fwd / _bwd) are torch.library custom ops defined in
// Python, where the per-call backend choice is made; the CUDA kernels register here
// under their own namespace so that a CUDA dispatch-key kernel never overrides the
// triton backend for every CUDA tensor. Kernels live in csrc/<op>/*.cu as plain CUDA
// (no torch headers) and are bound here with argument checks that name each dimension.

#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "attention/api.h"
#include "ffn/ffn.cuh"
#include "ffn/ffn_traits.cuh"
#include "layer_norm/layer_norm.cuh"

// What the build was made for, defined on the compiler's command line by setup.py.
#define FASTATTN_STRINGIZE_ARGS(...) #__VA_ARGS__
#define FASTATTN_STRINGIZE(...) FASTATTN_STRINGIZE_ARGS(__VA_ARGS__)

namespace fastattn {

// "fastattn._C cuda=13.0 torch=2.11.0 torch_cuda=13.0 archs=sm_80,sm_90a": the CUDA
// toolkit it was compiled with, the torch (and that torch's CUDA) it was built against,
// and the GPU code it holds; "unknown" for what a build outside setup.py did not say.
std::string build_info() {
  std::string info = "fastattn._C";
#ifdef FASTATTN_BUILT_CUDA_MAJOR
  info += " cuda=" + std::to_string(FASTATTN_BUILT_CUDA_MAJOR) + "." + std::to_string(FASTATTN_BUILT_CUDA_MINOR);
#else
  info += " cuda=unknown";
#endif
#ifdef FASTATTN_BUILT_TORCH_MAJOR
  info += " torch=" + std::to_string(FASTATTN_BUILT_TORCH_MAJOR) + "." + std::to_string(FASTATTN_BUILT_TORCH_MINOR) +
          "." + std::to_string(FASTATTN_BUILT_TORCH_PATCH);
  info += " torch_cuda=" + std::to_string(FASTATTN_BUILT_TORCH_CUDA_MAJOR) + "." +
          std::to_string(FASTATTN_BUILT_TORCH_CUDA_MINOR);
#else
  info += " torch=unknown";
#endif
#ifdef FASTATTN_BUILT_GPU_TARGETS
  info += " archs=" FASTATTN_STRINGIZE(FASTATTN_BUILT_GPU_TARGETS);
#else
  info += " archs=unknown";
#endif
  return info;
}

}  // namespace fastattn

// ----------------------------------------------------------------------------- norms and FFN
// Bindings of csrc/layer_norm and csrc/ffn. The Python cuda backend (ops/layer_norm.py,
// rms_norm.py, ffn.py, gated_ffn.py) adapts dtypes to what these accept; the checks here
// guard the kernels' contract and name each dimension.

namespace fastattn {
namespace {

// The current CUDA stream of t's device, as a cudaStream_t. This file is syntax-checked on
// CI against torch's CPU headers, which lack c10/cuda/impl/cuda_cmake_macros.h, so it
// cannot include c10/cuda: the device-generic guard interface reaches the CUDA backend
// that libc10_cuda registers at load time, and Stream::native_handle() is the stream.
void* cuda_stream_of(const at::Tensor& t) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(t.device()).native_handle();
}

DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  return DType::kFloat32;
}

void check_on_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
                    like.device());
}

// t is (rows, cols), named "(rows_name, cols_name)" in messages.
void check_matrix(const at::Tensor& t, int64_t rows, const char* rows_name, int64_t cols, const char* cols_name,
                  const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must have shape (",
                    rows_name, ", ", cols_name, ") = (", rows, ", ", cols, "), got ", t.sizes());
}

void check_vector(const at::Tensor& t, int64_t size, const char* size_name, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape (", size_name, ",) = (",
                    size, ",), got ", t.sizes());
}

// Rows with contiguous columns (any row stride, 0 included) as the elementwise kernels read
// them; anything else is copied.
at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

// A GEMM operand: contiguous columns and a row stride of at least the row length.
at::Tensor gemm_operand(const at::Tensor& t) {
  const bool row_major = (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= std::max<int64_t>(1, t.size(1));
  return row_major ? t : t.contiguous();
}

// A 1-D parameter as a contiguous vector.
at::Tensor dense_vector(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// ---- layer norm / RMSNorm

// weight and bias: (hidden,), both in x's dtype or both float32.
void check_norm_params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& x, int64_t hidden, const char* op) {
  std::optional<at::ScalarType> param_dtype;
  for (const auto& [name, param] : {std::pair<const char*, const std::optional<at::Tensor>*>{"weight", &weight},
                                    std::pair<const char*, const std::optional<at::Tensor>*>{"bias", &bias}}) {
    if (!param->has_value()) continue;
    const at::Tensor& t = param->value();
    check_on_device(t, x, op, name);
    check_vector(t, hidden, "hidden", op, name);
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name,
                     " must be in x's dtype ", x.scalar_type(), " or float32, got ", t.scalar_type());
    TORCH_CHECK_TYPE(!param_dtype || *param_dtype == t.scalar_type(), op,
                     ": weight and bias must share one dtype, got ", *param_dtype, " and ", t.scalar_type());
    param_dtype = t.scalar_type();
  }
}

DType norm_param_dtype(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, DType x) {
  const std::optional<at::Tensor>& present = weight.has_value() ? weight : bias;
  return present.has_value() && present->scalar_type() == at::kFloat ? DType::kFloat32 : x;
}

const void* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Forward of layer norm (is_rms_norm false) or RMSNorm on x (rows, hidden), of s = x + residual
// when a residual is given. residual_out (= s) takes the residual's dtype, which must be x's
// or float32. Returns (y, residual_out or a 0-element placeholder, mean (rows,) fp32 or a
// placeholder for RMSNorm, rstd (rows,) fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& residual_in, double eps, bool is_rms_norm) {
  constexpr const char* op = "fastattn_cuda::layer_norm_fwd";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be 2-D (rows, hidden), got shape ", x_in.sizes());
  check_on_device(x_in, x_in, op, "x");
  const int64_t rows = x_in.size(0);
  const int64_t hidden = x_in.size(1);
  TORCH_CHECK_VALUE(hidden > 0, op, ": x must have hidden > 0, got shape ", x_in.sizes());
  const DType x_dtype = kernel_dtype(x_in, op, "x");
  check_norm_params(weight_in, bias_in, x_in, hidden, op);
  TORCH_CHECK_VALUE(!is_rms_norm || !bias_in.has_value(), op, ": RMSNorm takes no bias");
  DType residual_dtype = x_dtype;
  if (residual_in.has_value()) {
    check_on_device(*residual_in, x_in, op, "residual");
    check_matrix(*residual_in, rows, "rows", hidden, "hidden", op, "residual");
    residual_dtype = kernel_dtype(*residual_in, op, "residual");
    TORCH_CHECK_TYPE(residual_dtype == x_dtype || residual_dtype == DType::kFloat32, op,
                     ": residual must be in x's dtype ", x_in.scalar_type(), " or float32, got ",
                     residual_in->scalar_type());
  }

  const at::Tensor x = unit_column_stride(x_in);
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = unit_column_stride(*residual_in);
  std::optional<at::Tensor> weight;
  std::optional<at::Tensor> bias;
  if (weight_in.has_value()) weight = dense_vector(*weight_in);
  if (bias_in.has_value()) bias = dense_vector(*bias_in);

  const auto stats_options = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({rows, hidden}, x.options());
  at::Tensor residual_out =
      residual.has_value() ? at::empty({rows, hidden}, residual->options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({is_rms_norm ? 0 : rows}, stats_options);
  at::Tensor rstd = at::empty({rows}, stats_options);
  if (rows == 0) return {y, residual_out, mean, rstd};

  const c10::DeviceGuard guard(x.device());
  NormFwdParams p;
  p.x = x.data_ptr();
  p.residual = data_or_null(residual);
  p.weight = data_or_null(weight);
  p.bias = data_or_null(bias);
  p.y = y.data_ptr();
  p.residual_out = residual.has_value() ? residual_out.data_ptr() : nullptr;
  p.mean = is_rms_norm ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.hidden = hidden;
  p.stride_xm = x.stride(0);
  p.stride_rm = residual.has_value() ? residual->stride(0) : 0;
  p.stride_ym = y.stride(0);
  p.stride_om = residual.has_value() ? residual_out.stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.is_rms_norm = is_rms_norm;
  p.x_dtype = x_dtype;
  p.residual_dtype = residual_dtype;
  p.weight_dtype = norm_param_dtype(weight, bias, x_dtype);
  layer_norm_fwd(p, cuda_stream_of(x));
  return {y, residual_out, mean, rstd};
}

// Gradients (ds, dweight, dbias) of norm_fwd given dy (rows, hidden) and dresidual_out (the
// gradient of residual_out, in s's dtype, or None). s is what the forward normalized, in dy's
// dtype or float32; ds takes s's dtype, dweight / dbias the parameters' (0-element
// placeholders in s's dtype for absent ones). mean is None for RMSNorm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& dresidual_out_in, const at::Tensor& s_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& mean_in, const at::Tensor& rstd_in, bool is_rms_norm) {
  constexpr const char* op = "fastattn_cuda::layer_norm_bwd";
  TORCH_CHECK_VALUE(s_in.dim() == 2, op, ": s must be 2-D (rows, hidden), got shape ", s_in.sizes());
  check_on_device(s_in, s_in, op, "s");
  const int64_t rows = s_in.size(0);
  const int64_t hidden = s_in.size(1);
  TORCH_CHECK_VALUE(hidden > 0, op, ": s must have hidden > 0, got shape ", s_in.sizes());
  check_on_device(dy_in, s_in, op, "dy");
  check_matrix(dy_in, rows, "rows", hidden, "hidden", op, "dy");
  const DType x_dtype = kernel_dtype(dy_in, op, "dy");
  const DType residual_dtype = kernel_dtype(s_in, op, "s");
  TORCH_CHECK_TYPE(residual_dtype == x_dtype || residual_dtype == DType::kFloat32, op, ": s must be in dy's dtype ",
                   dy_in.scalar_type(), " or float32, got ", s_in.scalar_type());
  if (dresidual_out_in.has_value()) {
    check_on_device(*dresidual_out_in, s_in, op, "dresidual_out");
    check_matrix(*dresidual_out_in, rows, "rows", hidden, "hidden", op, "dresidual_out");
    TORCH_CHECK_TYPE(dresidual_out_in->scalar_type() == s_in.scalar_type(), op,
                     ": dresidual_out must be in s's dtype ", s_in.scalar_type(), ", got ",
                     dresidual_out_in->scalar_type());
  }
  check_norm_params(weight_in, bias_in, dy_in, hidden, op);
  TORCH_CHECK_VALUE(!is_rms_norm || !bias_in.has_value(), op, ": RMSNorm takes no bias");
  TORCH_CHECK_VALUE(is_rms_norm || mean_in.has_value(), op, ": layer norm needs the saved mean");
  for (const auto& [name, stat] : {std::pair<const char*, const at::Tensor*>{"rstd", &rstd_in},
                                   std::pair<const char*, const at::Tensor*>{"mean", mean_in ? &*mean_in : nullptr}}) {
    if (stat == nullptr) continue;
    check_on_device(*stat, s_in, op, name);
    check_vector(*stat, rows, "rows", op, name);
    TORCH_CHECK_TYPE(stat->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", stat->scalar_type());
  }

  const at::Tensor dy = unit_column_stride(dy_in);
  const at::Tensor s = unit_column_stride(s_in);
  std::optional<at::Tensor> dresidual_out;
  if (dresidual_out_in.has_value()) dresidual_out = unit_column_stride(*dresidual_out_in);
  std::optional<at::Tensor> weight;
  if (weight_in.has_value()) weight = dense_vector(*weight_in);
  const at::Tensor rstd = dense_vector(rstd_in);
  std::optional<at::Tensor> mean;
  if (!is_rms_norm) mean = dense_vector(*mean_in);

  at::Tensor ds = at::empty({rows, hidden}, s.options());
  at::Tensor dweight = weight_in.has_value() ? at::empty({hidden}, weight_in->options()) : at::empty({0}, s.options());
  at::Tensor dbias = bias_in.has_value() ? at::empty({hidden}, bias_in->options()) : at::empty({0}, s.options());
  if (rows == 0) {
    dweight.zero_();
    dbias.zero_();
    return {ds, dweight, dbias};
  }

  const c10::DeviceGuard guard(s.device());
  NormBwdParams p;
  p.dy = dy.data_ptr();
  p.dresidual_out = data_or_null(dresidual_out);
  p.s = s.data_ptr();
  p.weight = data_or_null(weight);
  p.mean = mean.has_value() ? mean->data_ptr<float>() : nullptr;
  p.rstd = rstd.data_ptr<float>();
  p.ds = ds.data_ptr();
  p.dweight = weight_in.has_value() ? dweight.data_ptr() : nullptr;
  p.dbias = bias_in.has_value() ? dbias.data_ptr() : nullptr;
  p.rows = rows;
  p.hidden = hidden;
  p.stride_dym = dy.stride(0);
  p.stride_drm = dresidual_out.has_value() ? dresidual_out->stride(0) : 0;
  p.stride_sm = s.stride(0);
  p.stride_dsm = ds.stride(0);
  p.is_rms_norm = is_rms_norm;
  p.x_dtype = x_dtype;
  p.residual_dtype = residual_dtype;
  p.weight_dtype = norm_param_dtype(weight_in, bias_in, x_dtype);
  const NormBwdPlan plan = layer_norm_bwd_plan(p);
  const auto partial_options = s.options().dtype(at::kFloat);
  at::Tensor dweight_partial;
  at::Tensor dbias_partial;
  if (p.dweight != nullptr) {
    dweight_partial = at::empty({plan.partial_rows, hidden}, partial_options);
    p.dweight_partial = dweight_partial.data_ptr<float>();
  }
  if (p.dbias != nullptr) {
    dbias_partial = at::empty({plan.partial_rows, hidden}, partial_options);
    p.dbias_partial = dbias_partial.data_ptr<float>();
  }
  layer_norm_bwd(p, plan, cuda_stream_of(s));
  return {ds, dweight, dbias};
}

// ---- FFN

Activation parse_activation(const std::string& name, const char* op) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, op, ": activation must be gelu, gelu_tanh, relu or silu, got '", name, "'");
  return Activation::kGelu;
}

// FASTATTN_FFN_CUDA_CONFIG pins GEMM choices so tests reach every path:
//   lt=0           ATen's matmul instead of cuBLASLt
//   lt_epilogue=0  no fused cuBLASLt epilogues (bias and GELU by our elementwise kernels)
//   vec=0          one-element accesses in the elementwise kernels (read by csrc/ffn)
struct FfnOptions {
  bool use_lt = true;
  bool lt_epilogues = true;
};

FfnOptions read_ffn_options() {
  FfnOptions options;
  const char* env = std::getenv("FASTATTN_FFN_CUDA_CONFIG");
  if (env == nullptr) return options;
  std::string spec(env);
  size_t start = 0;
  while (start <= spec.size()) {
    size_t end = spec.find(',', start);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
    TORCH_CHECK_VALUE(value == "0" || value == "1", "FASTATTN_FFN_CUDA_CONFIG: ", key, " must be 0 or 1, got '",
                      value, "'");
    if (key == "lt") {
      options.use_lt = value == "1";
    } else if (key == "lt_epilogue") {
      options.lt_epilogues = value == "1";
    } else {
      TORCH_CHECK_VALUE(key == "vec", "FASTATTN_FFN_CUDA_CONFIG: unknown key '", key, "' (lt, lt_epilogue, vec)");
    }
  }
  return options;
}

// What every GEMM of one FFN call shares.
struct GemmContext {
  FfnOptions options;
  at::Tensor workspace;
  void* stream;
  DType dtype;
};

GemmContext make_gemm_context(const at::Tensor& x, const char* op) {
  GemmContext ctx{read_ffn_options(), at::Tensor(), cuda_stream_of(x), kernel_dtype(x, op, "x")};
  if (ctx.options.use_lt) {
    ctx.workspace = at::empty({static_cast<int64_t>(FfnTraits::kGemmWorkspaceBytes)}, x.options().dtype(at::kByte));
  }
  return ctx;
}

GemmParams gemm_params(const at::Tensor& d, const at::Tensor& a, bool trans_a, const at::Tensor& b, bool trans_b,
                       const GemmContext& ctx) {
  GemmParams p;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.d = d.data_ptr();
  p.lda = a.stride(0);
  p.ldb = b.stride(0);
  p.ldd = d.stride(0);
  p.trans_a = trans_a;
  p.trans_b = trans_b;
  p.m = d.size(0);
  p.n = d.size(1);
  p.k = trans_a ? a.size(0) : a.size(1);
  p.dtype = ctx.dtype;
  p.workspace = ctx.options.use_lt ? ctx.workspace.data_ptr() : nullptr;
  p.workspace_bytes = FfnTraits::kGemmWorkspaceBytes;
  return p;
}

// d += bias (broadcast over rows) with the elementwise kernel.
void add_bias(const at::Tensor& d, const at::Tensor& bias, const GemmContext& ctx) {
  ActFwdParams p;
  p.hidden = d.data_ptr();
  p.bias = bias.data_ptr();
  p.out = d.data_ptr();
  p.rows = d.size(0);
  p.cols = d.size(1);
  p.stride_hm = d.stride(0);
  p.stride_om = d.stride(0);
  p.activation = Activation::kIdentity;
  p.dtype = ctx.dtype;
  ffn_act_fwd(p, ctx.stream);
}

// d (m, n) = op(a)·op(b) (+ bias) (+ d when accumulate); d is a fresh contiguous matrix, a and
// b GEMM operands (gemm_operand). cuBLASLt with the bias epilogue where it serves, then
// cuBLASLt and our bias kernel (or, with defer_bias, the caller's fused elementwise pass),
// then ATen. Returns true when the bias is left to the caller.
bool gemm(at::Tensor d, const at::Tensor& a, bool trans_a, const at::Tensor& b, bool trans_b,
          const std::optional<at::Tensor>& bias, bool accumulate, const GemmContext& ctx, bool defer_bias = false) {
  if (d.numel() == 0) return false;
  if (ctx.options.use_lt) {
    GemmParams p = gemm_params(d, a, trans_a, b, trans_b, ctx);
    p.beta = accumulate ? 1.f : 0.f;
    if (bias.has_value() && ctx.options.lt_epilogues) {
      p.epilogue = GemmEpilogue::kBias;
      p.bias = bias->data_ptr();
      if (gemm_lt(p, ctx.stream)) return false;
      p.epilogue = GemmEpilogue::kNone;
      p.bias = nullptr;
    }
    if (gemm_lt(p, ctx.stream)) {
      if (!bias.has_value()) return false;
      if (defer_bias) return true;
      add_bias(d, *bias, ctx);
      return false;
    }
  }
  const at::Tensor op_a = trans_a ? a.t() : a;
  const at::Tensor op_b = trans_b ? b.t() : b;
  if (accumulate) {
    d.addmm_(op_a, op_b);
  } else if (bias.has_value()) {
    at::addmm_out(d, *bias, op_a, op_b);
  } else {
    at::mm_out(d, op_a, op_b);
  }
  return false;
}

// Same dtype as x, on x's device; the names and shapes are checked by the callers.
void check_ffn_operand(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_on_device(t, x, op, name);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                   ", got ", t.scalar_type());
}

void check_ffn_weights(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                       const at::Tensor& w2, const std::optional<at::Tensor>& b2, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (tokens, d_model), got shape ", x.sizes());
  check_on_device(x, x, op, "x");
  kernel_dtype(x, op, "x");
  const int64_t d_model = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2, op, ": w1 must be 2-D (d_hidden, d_model), got shape ", w1.sizes());
  const int64_t d_hidden = w1.size(0);
  check_ffn_operand(w1, x, op, "w1");
  check_matrix(w1, d_hidden, "d_hidden", d_model, "d_model", op, "w1");
  TORCH_CHECK_VALUE(w2.dim() == 2, op, ": w2 must be 2-D (d_out, d_hidden), got shape ", w2.sizes());
  check_ffn_operand(w2, x, op, "w2");
  check_matrix(w2, w2.size(0), "d_out", d_hidden, "d_hidden", op, "w2");
  if (b1.has_value()) {
    check_ffn_operand(*b1, x, op, "b1");
    check_vector(*b1, d_hidden, "d_hidden", op, "b1");
  }
  if (b2.has_value()) {
    check_ffn_operand(*b2, x, op, "b2");
    check_vector(*b2, w2.size(0), "d_out", op, "b2");
  }
}

std::optional<at::Tensor> dense_optional(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return dense_vector(*t);
}

// hidden_pre = x·W1ᵀ + b1 into `hidden`, and act(hidden_pre) into `activated`: through
// cuBLASLt's GELU epilogue for gelu_tanh where it serves, else the GEMM (with its bias
// epilogue) and our elementwise kernel, which adds b1 itself when the GEMM could not.
void ffn_first_layer(const at::Tensor& hidden, const at::Tensor& activated, const at::Tensor& x,
                     const at::Tensor& w1, const std::optional<at::Tensor>& b1, Activation activation,
                     const GemmContext& ctx) {
  if (activation == Activation::kGeluTanh && ctx.options.use_lt && ctx.options.lt_epilogues && x.size(1) > 0) {
    GemmParams p = gemm_params(activated, x, false, w1, true, ctx);
    p.epilogue = GemmEpilogue::kGeluTanhAux;
    p.bias = b1.has_value() ? b1->data_ptr() : nullptr;
    p.aux = hidden.data_ptr();
    p.ld_aux = hidden.stride(0);
    if (gemm_lt(p, ctx.stream)) return;
  }
  const bool bias_pending = gemm(hidden, x, false, w1, true, b1, false, ctx, /*defer_bias=*/true);
  ActFwdParams p;
  p.hidden = hidden.data_ptr();
  p.bias = bias_pending ? b1->data_ptr() : nullptr;
  p.store_hidden = bias_pending;
  p.out = activated.data_ptr();
  p.rows = hidden.size(0);
  p.cols = hidden.size(1);
  p.stride_hm = hidden.stride(0);
  p.stride_om = activated.stride(0);
  p.activation = activation;
  p.dtype = ctx.dtype;
  ffn_act_fwd(p, ctx.stream);
}

// (y (tokens, d_out), hidden_pre (tokens, d_hidden) or a 0-element placeholder) of
// act(x·W1ᵀ + b1)·W2ᵀ + b2.
std::tuple<at::Tensor, at::Tensor> ffn_fwd(const at::Tensor& x_in, const at::Tensor& w1_in,
                                           const std::optional<at::Tensor>& b1_in, const at::Tensor& w2_in,
                                           const std::optional<at::Tensor>& b2_in, std::string activation_name,
                                           bool save_hidden) {
  constexpr const char* op = "fastattn_cuda::ffn_fwd";
  check_ffn_weights(x_in, w1_in, b1_in, w2_in, b2_in, op);
  const Activation activation = parse_activation(activation_name, op);
  const int64_t tokens = x_in.size(0);
  const int64_t d_hidden = w1_in.size(0);
  const int64_t d_out = w2_in.size(0);
  at::Tensor y = at::empty({tokens, d_out}, x_in.options());
  at::Tensor hidden = at::empty({tokens, d_hidden}, x_in.options());
  const at::Tensor placeholder = at::empty({0}, x_in.options());
  if (tokens == 0) return {y, save_hidden ? hidden : placeholder};

  const c10::DeviceGuard guard(x_in.device());
  const GemmContext ctx = make_gemm_context(x_in, op);
  const at::Tensor x = gemm_operand(x_in);
  at::Tensor activated = at::empty({tokens, d_hidden}, x.options());
  ffn_first_layer(hidden, activated, x, gemm_operand(w1_in), dense_optional(b1_in), activation, ctx);
  gemm(y, activated, false, gemm_operand(w2_in), true, dense_optional(b2_in), false, ctx);
  return {y, save_hidden ? hidden : placeholder};
}

// bias gradient Σ_rows m into `out` (cols,), deterministic two-stage column sum.
void bias_grad(const at::Tensor& out, const at::Tensor& m, const GemmContext& ctx) {
  const int64_t rows = m.size(0);
  const int64_t cols = m.size(1);
  at::Tensor partial = at::empty({ffn_partial_rows(rows), cols}, m.options().dtype(at::kFloat));
  ColumnSumParams p;
  p.x = m.data_ptr();
  p.partial = partial.data_ptr<float>();
  p.rows = rows;
  p.cols = cols;
  p.stride_xm = m.stride(0);
  p.dtype = ctx.dtype;
  column_sum(p, ctx.stream);
  reduce_partial_rows(partial.data_ptr<float>(), partial.size(0), cols, out.data_ptr(), ctx.dtype, ctx.stream);
}

// Gradients (dx, dw1, db1, dw2, db2) of ffn_fwd; absent biases get 0-element placeholders.
// hidden_pre is the saved x·W1ᵀ + b1, or None to recompute it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& w1_in, const std::optional<at::Tensor>& b1_in,
    const at::Tensor& w2_in, const std::optional<at::Tensor>& b2_in, const std::optional<at::Tensor>& hidden_pre_in,
    std::string activation_name) {
  constexpr const char* op = "fastattn_cuda::ffn_bwd";
  check_ffn_weights(x_in, w1_in, b1_in, w2_in, b2_in, op);
  const Activation activation = parse_activation(activation_name, op);
  const int64_t tokens = x_in.size(0);
  const int64_t d_model = x_in.size(1);
  const int64_t d_hidden = w1_in.size(0);
  const int64_t d_out = w2_in.size(0);
  check_ffn_operand(dy_in, x_in, op, "dy");
  check_matrix(dy_in, tokens, "tokens", d_out, "d_out", op, "dy");
  if (hidden_pre_in.has_value()) {
    check_ffn_operand(*hidden_pre_in, x_in, op, "hidden_pre");
    check_matrix(*hidden_pre_in, tokens, "tokens", d_hidden, "d_hidden", op, "hidden_pre");
  }
  const auto options = x_in.options();
  at::Tensor dx = at::empty({tokens, d_model}, options);
  at::Tensor dw1 = at::empty({d_hidden, d_model}, options);
  at::Tensor dw2 = at::empty({d_out, d_hidden}, options);
  at::Tensor db1 = b1_in.has_value() ? at::empty({d_hidden}, options) : at::empty({0}, options);
  at::Tensor db2 = b2_in.has_value() ? at::empty({d_out}, options) : at::empty({0}, options);
  if (tokens == 0) {
    for (at::Tensor* t : {&dw1, &dw2, &db1, &db2}) t->zero_();
    return {dx, dw1, db1, dw2, db2};
  }

  const c10::DeviceGuard guard(x_in.device());
  const GemmContext ctx = make_gemm_context(x_in, op);
  const at::Tensor x = gemm_operand(x_in);
  const at::Tensor w1 = gemm_operand(w1_in);
  const at::Tensor w2 = gemm_operand(w2_in);
  const at::Tensor dy = gemm_operand(dy_in);
  at::Tensor hidden;
  if (hidden_pre_in.has_value()) {
    hidden = unit_column_stride(*hidden_pre_in);
  } else {
    hidden = at::empty({tokens, d_hidden}, options);
    gemm(hidden, x, false, w1, true, dense_optional(b1_in), false, ctx);
  }
  // dA = dy·W2, then in place dH = dA ∘ act'(H); A = act(H) for dW2; db1 partials.
  at::Tensor dhidden = at::empty({tokens, d_hidden}, options);
  gemm(dhidden, dy, false, w2, false, std::nullopt, false, ctx);
  at::Tensor activated = at::empty({tokens, d_hidden}, options);
  at::Tensor db1_partial;
  ActBwdParams p;
  p.dout = dhidden.data_ptr();
  p.hidden = hidden.data_ptr();
  p.dhidden = dhidden.data_ptr();
  p.out = activated.data_ptr();
  if (b1_in.has_value()) {
    db1_partial = at::empty({ffn_partial_rows(tokens), d_hidden}, options.dtype(at::kFloat));
    p.dbias_partial = db1_partial.data_ptr<float>();
  }
  p.rows = tokens;
  p.cols = d_hidden;
  p.stride_dom = dhidden.stride(0);
  p.stride_hm = hidden.stride(0);
  p.stride_dhm = dhidden.stride(0);
  p.stride_om = activated.stride(0);
  p.activation = activation;
  p.dtype = ctx.dtype;
  ffn_act_bwd(p, ctx.stream);
  if (b1_in.has_value()) {
    reduce_partial_rows(db1_partial.data_ptr<float>(), db1_partial.size(0), d_hidden, db1.data_ptr(), ctx.dtype,
                        ctx.stream);
  }
  gemm(dw2, dy, true, activated, false, std::nullopt, false, ctx);  // dW2 = dyᵀ·A
  if (b2_in.has_value()) bias_grad(db2, dy, ctx);
  gemm(dw1, dhidden, true, x, false, std::nullopt, false, ctx);  // dW1 = dHᵀ·x
  gemm(dx, dhidden, false, w1, false, std::nullopt, false, ctx);  // dx = dH·W1
  return {dx, dw1, db1, dw2, db2};
}

void check_gated_weights(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                         const at::Tensor& w_down, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (tokens, d_model), got shape ", x.sizes());
  check_on_device(x, x, op, "x");
  kernel_dtype(x, op, "x");
  const int64_t d_model = x.size(1);
  TORCH_CHECK_VALUE(w_gate.dim() == 2, op, ": w_gate must be 2-D (d_hidden, d_model), got shape ", w_gate.sizes());
  const int64_t d_hidden = w_gate.size(0);
  check_ffn_operand(w_gate, x, op, "w_gate");
  check_matrix(w_gate, d_hidden, "d_hidden", d_model, "d_model", op, "w_gate");
  check_ffn_operand(w_up, x, op, "w_up");
  check_matrix(w_up, d_hidden, "d_hidden", d_model, "d_model", op, "w_up");
  TORCH_CHECK_VALUE(w_down.dim() == 2, op, ": w_down must be 2-D (d_out, d_hidden), got shape ", w_down.sizes());
  check_ffn_operand(w_down, x, op, "w_down");
  check_matrix(w_down, w_down.size(0), "d_out", d_hidden, "d_hidden", op, "w_down");
}

// (y (tokens, d_out), gate_pre, up_pre (tokens, d_hidden) or 0-element placeholders) of
// (act(x·W_gateᵀ) ∘ x·W_upᵀ)·W_downᵀ.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_fwd(const at::Tensor& x_in, const at::Tensor& w_gate_in,
                                                             const at::Tensor& w_up_in, const at::Tensor& w_down_in,
                                                             std::string activation_name, bool save_hidden) {
  constexpr const char* op = "fastattn_cuda::gated_ffn_fwd";
  check_gated_weights(x_in, w_gate_in, w_up_in, w_down_in, op);
  const Activation activation = parse_activation(activation_name, op);
  const int64_t tokens = x_in.size(0);
  const int64_t d_hidden = w_gate_in.size(0);
  const auto options = x_in.options();
  at::Tensor y = at::empty({tokens, w_down_in.size(0)}, options);
  at::Tensor gate = at::empty({tokens, d_hidden}, options);
  at::Tensor up = at::empty({tokens, d_hidden}, options);
  const at::Tensor placeholder = at::empty({0}, options);
  if (tokens == 0) {
    return {y, save_hidden ? gate : placeholder, save_hidden ? up : placeholder};
  }

  const c10::DeviceGuard guard(x_in.device());
  const GemmContext ctx = make_gemm_context(x_in, op);
  const at::Tensor x = gemm_operand(x_in);
  gemm(gate, x, false, gemm_operand(w_gate_in), true, std::nullopt, false, ctx);
  gemm(up, x, false, gemm_operand(w_up_in), true, std::nullopt, false, ctx);
  at::Tensor mixed = at::empty({tokens, d_hidden}, options);
  GatedFwdParams p;
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.mixed = mixed.data_ptr();
  p.rows = tokens;
  p.cols = d_hidden;
  p.stride_gm = gate.stride(0);
  p.stride_um = up.stride(0);
  p.stride_mm = mixed.stride(0);
  p.activation = activation;
  p.dtype = ctx.dtype;
  gated_act_fwd(p, ctx.stream);
  gemm(y, mixed, false, gemm_operand(w_down_in), true, std::nullopt, false, ctx);
  return {y, save_hidden ? gate : placeholder, save_hidden ? up : placeholder};
}

// Gradients (dx, dw_gate, dw_up, dw_down) of gated_ffn_fwd; gate_pre / up_pre are the saved
// pre-activations, or None to recompute them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_ffn_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& w_gate_in, const at::Tensor& w_up_in,
    const at::Tensor& w_down_in, const std::optional<at::Tensor>& gate_pre_in,
    const std::optional<at::Tensor>& up_pre_in, std::string activation_name) {
  constexpr const char* op = "fastattn_cuda::gated_ffn_bwd";
  check_gated_weights(x_in, w_gate_in, w_up_in, w_down_in, op);
  const Activation activation = parse_activation(activation_name, op);
  const int64_t tokens = x_in.size(0);
  const int64_t d_model = x_in.size(1);
  const int64_t d_hidden = w_gate_in.size(0);
  const int64_t d_out = w_down_in.size(0);
  check_ffn_operand(dy_in, x_in, op, "dy");
  check_matrix(dy_in, tokens, "tokens", d_out, "d_out", op, "dy");
  TORCH_CHECK_VALUE(gate_pre_in.has_value() == up_pre_in.has_value(), op,
                    ": gate_pre and up_pre are given together or not at all");
  for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>*>{"gate_pre", &gate_pre_in},
                                std::pair<const char*, const std::optional<at::Tensor>*>{"up_pre", &up_pre_in}}) {
    if (!t->has_value()) continue;
    check_ffn_operand(t->value(), x_in, op, name);
    check_matrix(t->value(), tokens, "tokens", d_hidden, "d_hidden", op, name);
  }
  const auto options = x_in.options();
  at::Tensor dx = at::empty({tokens, d_model}, options);
  at::Tensor dw_gate = at::empty({d_hidden, d_model}, options);
  at::Tensor dw_up = at::empty({d_hidden, d_model}, options);
  at::Tensor dw_down = at::empty({d_out, d_hidden}, options);
  if (tokens == 0) {
    for (at::Tensor* t : {&dw_gate, &dw_up, &dw_down}) t->zero_();
    return {dx, dw_gate, dw_up, dw_down};
  }

  const c10::DeviceGuard guard(x_in.device());
  const GemmContext ctx = make_gemm_context(x_in, op);
  const at::Tensor x = gemm_operand(x_in);
  const at::Tensor w_gate = gemm_operand(w_gate_in);
  const at::Tensor w_up = gemm_operand(w_up_in);
  const at::Tensor dy = gemm_operand(dy_in);
  at::Tensor gate;
  at::Tensor up;
  if (gate_pre_in.has_value()) {
    gate = unit_column_stride(*gate_pre_in);
    up = unit_column_stride(*up_pre_in);
  } else {
    gate = at::empty({tokens, d_hidden}, options);
    up = at::empty({tokens, d_hidden}, options);
    gemm(gate, x, false, w_gate, true, std::nullopt, false, ctx);
    gemm(up, x, false, w_up, true, std::nullopt, false, ctx);
  }
  // dM = dy·W_down; then dG, dU, and M written over dM.
  at::Tensor mixed = at::empty({tokens, d_hidden}, options);
  gemm(mixed, dy, false, gemm_operand(w_down_in), false, std::nullopt, false, ctx);
  at::Tensor dgate = at::empty({tokens, d_hidden}, options);
  at::Tensor dup = at::empty({tokens, d_hidden}, options);
  GatedBwdParams p;
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.dmixed = mixed.data_ptr();
  p.dgate = dgate.data_ptr();
  p.dup = dup.data_ptr();
  p.rows = tokens;
  p.cols = d_hidden;
  p.stride_gm = gate.stride(0);
  p.stride_um = up.stride(0);
  p.stride_mm = mixed.stride(0);
  p.stride_dgm = dgate.stride(0);
  p.stride_dum = dup.stride(0);
  p.activation = activation;
  p.dtype = ctx.dtype;
  gated_act_bwd(p, ctx.stream);
  gemm(dw_down, dy, true, mixed, false, std::nullopt, false, ctx);   // dW_down = dyᵀ·M
  gemm(dw_gate, dgate, true, x, false, std::nullopt, false, ctx);    // dW_gate = dGᵀ·x
  gemm(dw_up, dup, true, x, false, std::nullopt, false, ctx);        // dW_up = dUᵀ·x
  gemm(dx, dgate, false, w_gate, false, std::nullopt, false, ctx);   // dx = dG·W_gate
  gemm(dx, dup, false, w_up, false, std::nullopt, true, ctx);        //    + dU·W_up
  return {dx, dw_gate, dw_up, dw_down};
}

}  // namespace
}  // namespace fastattn

// ----------------------------------------------------------------------------- attention
// Bindings of csrc/attention (FlashAttention-2 on sm80+, the Hopper forward on sm90). The
// Python cuda backend (ops/attention.py) refuses what the kernels do not implement (bias,
// ALiBi, softcap, dropout, other head dims); the checks here guard the kernels' contract.

namespace fastattn {
namespace {

namespace attn = fastattn::attention;

// seqlen bound of the kernels' 32-bit index arithmetic (i + offset ± window stays in range).
constexpr int64_t kMaxAttentionSeqlen = int64_t(1) << 29;
// batch and heads are grid dimensions y and z.
constexpr int64_t kMaxAttentionGridDim = 65535;

// The kernels read and write rows with 16-byte vector accesses: head_dim contiguous, every
// other stride a multiple of 8 elements (0 included) and a 16-byte aligned base.
bool vector_accessible(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 8 == 0;
  return ok;
}

// An input as the kernels read it: itself, or a contiguous copy.
at::Tensor attention_operand(const at::Tensor& t) { return vector_accessible(t) ? t : t.contiguous(); }


// (batch, heads, seqlen) fp32 statistics with a unit seqlen stride.
at::Tensor attention_rows(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

void check_attention_tensor(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name,
                            const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D ", layout, ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                   ", got ", t.scalar_type());
}

// Checks q (batch, heads, seqlen_q, head_dim), k and v (batch, kv_heads, seqlen_k, head_dim)
// and fills the shape, masking and dtype fields of p.
void check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                         int64_t window_left, int64_t window_right, bool top_left, const char* op,
                         attn::FwdParams& p) {
  check_attention_tensor(q, q, op, "q", "(batch, heads, seqlen_q, head_dim)");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                   ": q must be float16 or bfloat16, got ", q.scalar_type());
  check_attention_tensor(k, q, op, "k", "(batch, kv_heads, seqlen_k, head_dim)");
  check_attention_tensor(v, q, op, "v", "(batch, kv_heads, seqlen_k, head_dim)");
  const int64_t batch = q.size(0), heads = q.size(1), seqlen_q = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(1), seqlen_k = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == batch && v.size(0) == batch, op, ": k and v must have q's batch ", batch,
                    ", got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == head_dim && v.size(3) == head_dim, op, ": k and v must have q's head_dim ",
                    head_dim, ", got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(v.size(1) == kv_heads && v.size(2) == seqlen_k, op,
                    ": v must have k's kv_heads and seqlen_k, got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(kv_heads > 0 && heads % kv_heads == 0, op, ": heads of q (", heads,
                    ") must be a multiple of kv_heads of k and v (", kv_heads, ")");
  int head_dims[16];
  const int n_head_dims = attn::compiled_head_dims(head_dims, 16);
  TORCH_CHECK_VALUE(std::find(head_dims, head_dims + n_head_dims, head_dim) != head_dims + n_head_dims, op,
                    ": no kernel for head_dim ", head_dim, " (q.shape[3]); built for ",
                    c10::IntArrayRef(std::vector<int64_t>(head_dims, head_dims + n_head_dims)));
  TORCH_CHECK_VALUE(seqlen_q < kMaxAttentionSeqlen && seqlen_k < kMaxAttentionSeqlen, op,
                    ": seqlen_q (", seqlen_q, ") and seqlen_k (", seqlen_k, ") must be < ", kMaxAttentionSeqlen);
  TORCH_CHECK_VALUE(batch <= kMaxAttentionGridDim && heads <= kMaxAttentionGridDim, op, ": batch (", batch,
                    ") and heads (", heads, ") must be <= ", kMaxAttentionGridDim);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op,
                    ": window_left and window_right must be >= -1 (-1 = unbounded), got ", window_left, " and ",
                    window_right);
  TORCH_CHECK_VALUE(scale > 0, op, ": scale must be > 0, got ", scale);
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.head_dim = static_cast<int>(head_dim);
  p.heads_per_kv_head = static_cast<int>(heads / kv_heads);
  p.dtype = q.scalar_type() == at::kBFloat16 ? attn::DType::kBFloat16 : attn::DType::kFloat16;
  p.scale = static_cast<float>(scale);
  // A window wider than both sequences constrains nothing; clamping keeps it in int range.
  const int64_t widest = seqlen_q + seqlen_k;
  p.window_left = static_cast<int>(std::min(window_left, widest));
  p.window_right = static_cast<int>(std::min(window_right, widest));
  attn::finalize_masking(p, top_left);
}

// (out (batch, heads, seqlen_q, head_dim), lse (batch, heads, seqlen_q) fp32) of softmax(scale·q·kᵀ
// masked)·v; key j is visible from query i iff i + off - window_left <= j <= i + off + window_right
// (-1 = unbounded), off = seqlen_k - seqlen_q, or 0 when top_left. A row that sees no key gives 0
// and lse -inf.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, double scale, int64_t window_left,
                                                 int64_t window_right, bool top_left) {
  constexpr const char* op = "fastattn_cuda::attention_fwd";
  attn::FwdParams p{};
  check_attention_qkv(q_in, k_in, v_in, scale, window_left, window_right, top_left, op, p);
  at::Tensor out = at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q_in.size(0), q_in.size(1), q_in.size(2)}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (p.seqlen_k == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = attention_operand(q_in);
  const at::Tensor k = attention_operand(k_in);
  const at::Tensor v = attention_operand(v_in);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1), p.out_row_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  const char* err = attn::forward(p, cuda_stream_of(q));
  TORCH_CHECK(err == nullptr, op, ": ", err);
  const auto outcome = static_cast<attn::FwdOutcome>(attn::last_forward_outcome());
  if (outcome == attn::FwdOutcome::kSm80TmaQ || outcome == attn::FwdOutcome::kSm80TmaK ||
      outcome == attn::FwdOutcome::kSm80TmaV || outcome == attn::FwdOutcome::kSm80TmaRefused) {
    TORCH_WARN_ONCE(op, ": the Hopper forward cannot take these tensors, the sm80 forward ran instead (",
                    attn::describe(outcome), "). Strides that are positive multiples of 8 elements, such as a ",
                    ".contiguous() copy's, let it run. Said once per process.");
  }
  return {out, lse};
}

// Gradients (dq, dk, dv) of attention_fwd given dout (batch, heads, seqlen_q, head_dim) and
// dlse (batch, heads, seqlen_q) fp32 or None; dk and dv are summed over each GQA group.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale, int64_t window_left, int64_t window_right, bool top_left) {
  constexpr const char* op = "fastattn_cuda::attention_bwd";
  attn::BwdParams p{};
  check_attention_qkv(q_in, k_in, v_in, scale, window_left, window_right, top_left, op, p);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"dout", &dout_in},
                                std::pair<const char*, const at::Tensor*>{"out", &out_in}}) {
    check_attention_tensor(*t, q_in, op, name, "(batch, heads, seqlen_q, head_dim)");
    TORCH_CHECK_VALUE(t->sizes() == q_in.sizes(), op, ": ", name, " must have q's shape ", q_in.sizes(),
                      " (batch, heads, seqlen_q, head_dim), got ", t->sizes());
  }
  const std::vector<int64_t> rows_shape{q_in.size(0), q_in.size(1), q_in.size(2)};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"lse", &lse_in},
                                std::pair<const char*, const at::Tensor*>{"dlse", dlse_in ? &*dlse_in : nullptr}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->sizes() == c10::IntArrayRef(rows_shape), op, ": ", name,
                      " must have shape (batch, heads, seqlen_q) = ", c10::IntArrayRef(rows_shape), ", got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == q_in.device(), op, ": ", name, " is on ", t->device(), " but q is on ",
                      q_in.device());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
  }
  // Contiguous, as the op's fake implementation allocates them.
  const auto contiguous = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q_in.sizes(), contiguous);
  at::Tensor dk = at::empty(k_in.sizes(), contiguous);
  at::Tensor dv = at::empty(v_in.sizes(), contiguous);
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0 || p.seqlen_k == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }

  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = attention_operand(q_in);
  const at::Tensor k = attention_operand(k_in);
  const at::Tensor v = attention_operand(v_in);
  const at::Tensor out = attention_operand(out_in);
  const at::Tensor dout = attention_operand(dout_in);
  const at::Tensor lse = attention_rows(lse_in);
  std::optional<at::Tensor> dlse;
  if (dlse_in.has_value()) dlse = attention_rows(*dlse_in);
  at::Tensor delta = at::empty(rows_shape, q_in.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1), p.out_row_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  p.dout = dout.data_ptr();
  p.dout_batch_stride = dout.stride(0), p.dout_head_stride = dout.stride(1), p.dout_row_stride = dout.stride(2);
  p.dlse = dlse.has_value() ? dlse->data_ptr<float>() : nullptr;
  p.dlse_batch_stride = dlse.has_value() ? dlse->stride(0) : 0;
  p.dlse_head_stride = dlse.has_value() ? dlse->stride(1) : 0;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_batch_stride = dq.stride(0), p.dq_head_stride = dq.stride(1), p.dq_row_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_head_stride = dk.stride(1), p.dk_row_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0), p.dv_head_stride = dv.stride(1), p.dv_row_stride = dv.stride(2);
  p.delta = delta.data_ptr<float>();
  p.delta_batch_stride = delta.stride(0), p.delta_head_stride = delta.stride(1);
  const char* err = attn::backward(p, cuda_stream_of(q));
  TORCH_CHECK(err == nullptr, op, ": ", err);
  return {dq, dk, dv};
}

std::vector<int64_t> attention_head_dims() {
  int head_dims[16];
  const int n = attn::compiled_head_dims(head_dims, 16);
  return std::vector<int64_t>(head_dims, head_dims + n);
}

// Which forward this thread's last fastattn_cuda::attention_fwd ran: "sm90", "sm80: <why>"
// (dispatch.h), or "none" before the first.
std::string attention_last_forward() {
  const int outcome = attn::last_forward_outcome();
  return outcome < 0 ? "none" : attn::describe(static_cast<attn::FwdOutcome>(outcome));
}

// (outcomes, counts): every forward outcome as attention_last_forward names it, and how
// many forwards of this process had it.
std::tuple<std::vector<std::string>, std::vector<int64_t>> attention_forward_counts() {
  std::vector<int64_t> counts(attn::kForwardOutcomes);
  attn::forward_outcome_counts(counts.data());
  std::vector<std::string> outcomes;
  for (int i = 0; i < attn::kForwardOutcomes; ++i) {
    outcomes.emplace_back(attn::describe(static_cast<attn::FwdOutcome>(i)));
  }
  return {outcomes, counts};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY(fastattn_cuda, m) {
  m.def("build_info() -> str", &fastattn::build_info);
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, bool top_left) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
      "int window_left, int window_right, bool top_left) -> (Tensor, Tensor, Tensor)");
  m.def("attention_head_dims() -> int[]", &fastattn::attention_head_dims);
  m.def("attention_last_forward() -> str", &fastattn::attention_last_forward);
  m.def("attention_forward_counts() -> (str[], int[])", &fastattn::attention_forward_counts);
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool is_rms_norm) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor s, Tensor? weight, Tensor? bias, Tensor? mean, "
      "Tensor rstd, bool is_rms_norm) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, bool save_hidden) "
      "-> (Tensor, Tensor)");
  m.def(
      "ffn_bwd(Tensor dy, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? hidden_pre, "
      "str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gated_ffn_fwd(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, str activation, bool save_hidden) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gated_ffn_bwd(Tensor dy, Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? gate_pre, "
      "Tensor? up_pre, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_cuda, CUDA, m) {
  m.impl("attention_fwd", &fastattn::attention_fwd);
  m.impl("attention_bwd", &fastattn::attention_bwd);
  m.impl("layer_norm_fwd", &fastattn::norm_fwd);
  m.impl("layer_norm_bwd", &fastattn::norm_bwd);
  m.impl("ffn_fwd", &fastattn::ffn_fwd);
  m.impl("ffn_bwd", &fastattn::ffn_bwd);
  m.impl("gated_ffn_fwd", &fastattn::gated_ffn_fwd);
  m.impl("gated_ffn_bwd", &fastattn::gated_ffn_bwd);
}

// An importable extension module: `import fastattn._C` loads the library above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
