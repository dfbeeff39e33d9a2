// The Python module sqz_kernels._C: importing it loads this .so, whose static initialisers register
// the ops (csrc/registration.cpp + the backends). Its functions: call (below) and chain_build /
// chain_run (further down).
//
//   _C.call(op_name, *args) -> Tensor
//
// calls the op `op_name` ("codebook_conv2d", ...) through the dispatcher below the autograd keys,
// converting the arguments by the op's schema. Why: a layer at batch 1 is 30-100 us of kernel, and
// torch.ops' generic Python path (OpOverloadPacket, per-argument IValue conversion by schema in
// torch_python, the below-autograd context manager in Python) cost ~10 us per call here; a Fire
// passes 16 tensors. This converts the few argument types our schemas use directly. The call still
// goes through the dispatcher (backend selection, profiler records, dispatch modes); only the
// Python binding is shorter. Callers (sqz_kernels/ops.py: call_op) use it outside torch.compile;
// it returns NotImplemented (the caller then uses torch.ops) when a gradient can flow (grad mode
// on and a tensor argument requires grad), when a tensor argument is a subclass with
// __torch_function__, or when a torch function mode is on.
//
// Not built into the LibTorch (CMake) library, which has no Python.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <unordered_map>
#include <vector>

namespace {

const c10::OperatorHandle& op_handle(const char* name) {
  // Handles are stable for the life of the process; found once per op name. A linear scan of
  // the few names (no std::string built per call: "codebook_fused_fire" is past the SSO size).
  // A deque: adding a name never moves the others, so a reference `call` holds while the GIL is
  // released stays valid when another thread adds one.
  static std::deque<std::pair<std::string, c10::OperatorHandle>> handles;
  for (const auto& h : handles)
    if (std::strcmp(h.first.c_str(), name) == 0) return h.second;
  auto h = c10::Dispatcher::singleton().findSchema({std::string("sqz_kernels::") + name, ""});
  TORCH_CHECK_VALUE(h.has_value(), "sqz_kernels._C.call: no op sqz_kernels::", name);
  handles.emplace_back(name, *h);
  return handles.back().second;
}

// True for a tensor whose class overrides __torch_function__ (a plain tensor or an nn.Parameter,
// whose override is torch's "disabled" one, does not). The answer for a class is kept with the
// class's version tag, which CPython changes whenever an attribute of the class or of a base is
// set: a Fire passes 6 Parameters, and the attribute lookup through the MRO was ~0.1 us each.
bool overrides_torch_function(PyObject* o) {
  if (THPVariable_CheckExact(o)) return false;
  static PyObject* disabled = [] {
    PyObject* c = PyImport_ImportModule("torch._C");
    PyObject* f = c ? PyObject_GetAttrString(c, "_disabled_torch_function_impl") : nullptr;
    Py_XDECREF(c);
    return f;  // kept for the life of the process
  }();
  if (!disabled) throw python_error();
  PyTypeObject* type = Py_TYPE(o);
  struct Known {
    PyTypeObject* type;
    unsigned int tag;
  };
  static Known known[4] = {};  // classes seen not to override (under the GIL)
  const bool tagged = PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG);
  if (tagged)
    for (const Known& k : known)
      if (k.type == type && k.tag == type->tp_version_tag) return false;
  PyObject* f = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), "__torch_function__");
  if (!f) throw python_error();
  const bool overrides = f != disabled;
  Py_DECREF(f);
  // The lookup has just given the class a valid tag if it can have one.
  if (!overrides && PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)) {
    static int next = 0;
    known[next] = {type, type->tp_version_tag};
    next = (next + 1) % 4;
  }
  return overrides;
}

int64_t to_int(PyObject* o, const std::string& arg) {
  TORCH_CHECK_TYPE(PyLong_Check(o) && !PyBool_Check(o), "argument '", arg, "' must be an int");
  const int64_t v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

// One argument, converted to the schema's type. Only the types of sqz_kernels' schemas.
c10::IValue to_ivalue(PyObject* o, const c10::Argument& a) {
  const c10::TypePtr& t = a.type();
  switch (t->kind()) {
    case c10::TypeKind::TensorType:
      TORCH_CHECK_TYPE(THPVariable_Check(o), "argument '", a.name(), "' must be a Tensor");
      return THPVariable_Unpack(o);
    case c10::TypeKind::OptionalType:
      if (o == Py_None) return c10::IValue();
      TORCH_CHECK_TYPE(t->castRaw<c10::OptionalType>()->getElementType()->kind() ==
                               c10::TypeKind::TensorType && THPVariable_Check(o),
                       "argument '", a.name(), "' must be a Tensor or None");
      return THPVariable_Unpack(o);
    case c10::TypeKind::BoolType:
      TORCH_CHECK_TYPE(PyBool_Check(o), "argument '", a.name(), "' must be a bool");
      return o == Py_True;
    case c10::TypeKind::IntType:
      return to_int(o, a.name());
    case c10::TypeKind::ListType: {
      TORCH_CHECK_TYPE(t->castRaw<c10::ListType>()->getElementType()->kind() == c10::TypeKind::IntType &&
                           (PyList_Check(o) || PyTuple_Check(o)),
                       "argument '", a.name(), "' must be a list or tuple of ints");
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
      PyObject** items = PySequence_Fast_ITEMS(o);
      std::vector<int64_t> v(static_cast<size_t>(n));
      for (Py_ssize_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = to_int(items[i], a.name());
      return v;
    }
    default:
      TORCH_CHECK_TYPE(false, "sqz_kernels._C.call: argument '", a.name(), "' has type ", t->str(),
                       ", which call does not convert (use torch.ops)");
  }
}

PyObject* call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs >= 1 && PyUnicode_Check(args[0]),
                   "sqz_kernels._C.call(op_name, *args): op_name must be a str");
  const char* name = PyUnicode_AsUTF8(args[0]);
  if (!name) throw python_error();
  const c10::OperatorHandle& op = op_handle(name);
  const auto& schema_args = op.schema().arguments();
  const auto& returns = op.schema().returns();
  TORCH_CHECK_TYPE(returns.size() == 1 && returns[0].type()->kind() == c10::TypeKind::TensorType,
                   "sqz_kernels._C.call: sqz_kernels::", name,
                   " does not return one Tensor, which call does not convert (use torch.ops)");
  TORCH_CHECK_TYPE(static_cast<size_t>(nargs - 1) == schema_args.size(), "sqz_kernels::", name,
                   " takes ", schema_args.size(), " arguments, got ", nargs - 1);
  // A tensor subclass or an active __torch_function__ mode must see the call: NotImplemented
  // tells the caller to use torch.ops (which handles them).
  // So must a call through which a gradient can flow (the autograd kernel records it).
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  const bool grad_mode = at::GradMode::is_enabled();
  for (size_t i = 0; i < schema_args.size(); ++i) {
    PyObject* o = args[i + 1];
    if (!THPVariable_Check(o)) continue;
    if (overrides_torch_function(o)) Py_RETURN_NOTIMPLEMENTED;
    if (grad_mode && THPVariable_Unpack(o).requires_grad()) Py_RETURN_NOTIMPLEMENTED;
  }
  torch::jit::Stack stack;
  stack.reserve(schema_args.size());
  for (size_t i = 0; i < schema_args.size(); ++i) stack.push_back(to_ivalue(args[i + 1], schema_args[i]));
  {
    pybind11::gil_scoped_release no_gil;
    // Below the autograd keys: no gradient can flow (checked above; as
    // torch._C._AutoDispatchBelowAutograd in ops.call_op).
    c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset);
    op.callBoxed(&stack);
  }
  TORCH_INTERNAL_ASSERT(stack.size() == 1 && stack[0].isTensor());
  return THPVariable_Wrap(std::move(stack[0]).toTensor());
  END_HANDLE_TH_ERRORS
}

// ---------------------------------------------------------------------------------------------
// A chain of op calls run from one Python call (sqz_kernels.chain.KernelChain). Between two layers
// of a model the Python of nn.Module calls ran at 50-150 us here (it finds its objects evicted by
// the layer before: 20 us per layer with warm caches), ~0.8-1.2 ms of a 7.5 ms SqueezeNet.
//
//   _C.chain_build([(op_name, args, view), ...], final_view, guards=None) -> capsule
//   _C.chain_run(capsule, x) -> Tensor, or NotImplemented when a guard fails
//
// Step i calls op_name with args, its first argument replaced by the running tensor (x for the
// first step, else the previous step's output) viewed as `view` first when it is not None; the
// result is the last output viewed as final_view (or not). Arguments are converted once, at
// build: tensors are held by reference (in-place updates of the parameters are seen, replaced
// parameters are not). The chain runs below the autograd keys with the GIL released.
//
// guards = (example, [(dict, key, object), ...], [(dict, length), ...]): chain_run then returns
// NotImplemented (KernelChain runs the model instead) unless x has the example's type, dtype,
// device, sizes and strides, no torch function mode is on, every dict[key] is still that very
// object and every dict still has that length (KernelChain passes each module's `training` and
// layer flags, and its parameters, buffers and children: load_state_dict installs new tensors in
// Codebook layers, surgery replaces children), every tensor argument keeps its dtype, device,
// sizes and strides (model.double() changes them in place), and no gradient can flow (grad mode off, or
// neither x nor a tensor argument of the chain requires grad). Checked here, not in Python: a
// Python loop over SqueezeNet's 68 modules and 130 tensors took ~30-40 us a call.
struct ChainGuard {
  PyTypeObject* type = nullptr;  // x's class (borrowed: a tensor class lives as long as torch)
  at::ScalarType dtype;
  c10::Device device{c10::kCPU};
  std::vector<int64_t> sizes, strides;
  std::vector<std::array<PyObject*, 3>> entries;      // (dict, key, object), strong references
  std::vector<std::pair<PyObject*, Py_ssize_t>> lengths;  // (dict, length), strong references
  std::vector<at::Tensor> tensors;                   // the chain's tensor arguments
  // ... and their dtype, device, sizes and strides at build: model.double() / .to() / p.data = t
  // change a held tensor in place (same TensorImpl, so the same Python object for the entries)
  struct Meta {
    at::ScalarType dtype;
    c10::Device device;
    std::vector<int64_t> sizes, strides;
  };
  std::vector<Meta> metas;

  ~ChainGuard() {  // under the GIL (chain_build or the capsule's destructor)
    for (auto& e : entries)
      for (PyObject* o : e) Py_XDECREF(o);
    for (auto& l : lengths) Py_XDECREF(l.first);
  }

  bool passes(PyObject* xo, const at::Tensor& x) const {
    if (Py_TYPE(xo) != type || x.scalar_type() != dtype || x.device() != device ||
        x.sizes() != c10::IntArrayRef(sizes) || x.strides() != c10::IntArrayRef(strides) ||
        at::impl::torch_function_mode_enabled())
      return false;
    for (const auto& e : entries)
      if (PyDict_GetItem(e[0], e[1]) != e[2]) return false;  // borrowed; identity
    for (const auto& l : lengths)
      if (PyDict_GET_SIZE(l.first) != l.second) return false;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      const Meta& m = metas[i];
      if (t.scalar_type() != m.dtype || t.device() != m.device ||
          t.sizes() != c10::IntArrayRef(m.sizes) || t.strides() != c10::IntArrayRef(m.strides))
        return false;
    }
    if (at::GradMode::is_enabled()) {
      if (x.requires_grad()) return false;
      for (const at::Tensor& t : tensors)
        if (t.requires_grad()) return false;
    }
    return true;
  }
};

struct ChainStep {
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;  // args[0] is replaced per run
  std::vector<int64_t> view;      // empty: the running tensor as is
  bool has_view;
};

struct Chain {
  std::vector<ChainStep> steps;
  std::vector<int64_t> final_view;
  bool has_final_view;
  std::unique_ptr<ChainGuard> guard;  // null: none
};

std::unique_ptr<ChainGuard> make_guard(PyObject* g, const std::vector<ChainStep>& steps) {
  TORCH_CHECK_TYPE(PyTuple_Check(g) && PyTuple_GET_SIZE(g) == 3 &&
                       THPVariable_Check(PyTuple_GET_ITEM(g, 0)) &&
                       PyList_Check(PyTuple_GET_ITEM(g, 1)) && PyList_Check(PyTuple_GET_ITEM(g, 2)),
                   "sqz_kernels._C.chain_build: guards must be (example, [(dict, key, object)], "
                   "[(dict, length)])");
  auto gd = std::make_unique<ChainGuard>();
  PyObject* ex = PyTuple_GET_ITEM(g, 0);
  const at::Tensor e = THPVariable_Unpack(ex);
  gd->type = Py_TYPE(ex);
  gd->dtype = e.scalar_type();
  gd->device = e.device();
  gd->sizes = e.sizes().vec();
  gd->strides = e.strides().vec();
  PyObject* entries = PyTuple_GET_ITEM(g, 1);
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(entries); ++i) {
    PyObject* t = PyList_GET_ITEM(entries, i);
    TORCH_CHECK_TYPE(PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 3 &&
                         PyDict_Check(PyTuple_GET_ITEM(t, 0)),
                     "sqz_kernels._C.chain_build: a guard entry must be (dict, key, object)");
    std::array<PyObject*, 3> en{PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1),
                                PyTuple_GET_ITEM(t, 2)};
    for (PyObject* o : en) Py_INCREF(o);
    gd->entries.push_back(en);
  }
  PyObject* lengths = PyTuple_GET_ITEM(g, 2);
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lengths); ++i) {
    PyObject* t = PyList_GET_ITEM(lengths, i);
    TORCH_CHECK_TYPE(PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 2 &&
                         PyDict_Check(PyTuple_GET_ITEM(t, 0)),
                     "sqz_kernels._C.chain_build: a guard length must be (dict, int)");
    const int64_t n = to_int(PyTuple_GET_ITEM(t, 1), "a guard length");
    Py_INCREF(PyTuple_GET_ITEM(t, 0));
    gd->lengths.emplace_back(PyTuple_GET_ITEM(t, 0), static_cast<Py_ssize_t>(n));
  }
  for (const ChainStep& st : steps)
    for (size_t j = 1; j < st.args.size(); ++j)
      if (st.args[j].isTensor()) {
        const at::Tensor& t = st.args[j].toTensor();
        gd->tensors.push_back(t);
        gd->metas.push_back({t.scalar_type(), t.device(), t.sizes().vec(), t.strides().vec()});
      }
  return gd;
}

const char* kChainCapsule = "sqz_kernels.Chain";

bool optional_shape(PyObject* o, std::vector<int64_t>& out, const char* what) {
  if (o == Py_None) return false;
  TORCH_CHECK_TYPE(PyList_Check(o) || PyTuple_Check(o), what, " must be None or a list of ints");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject** items = PySequence_Fast_ITEMS(o);
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = to_int(items[i], what);
  return true;
}

PyObject* chain_build(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE((nargs == 2 || nargs == 3) && PyList_Check(args[0]),
                   "sqz_kernels._C.chain_build(steps, final_view, guards=None): steps must be a "
                   "list");
  auto chain = std::make_unique<Chain>();
  const Py_ssize_t n = PyList_GET_SIZE(args[0]);
  TORCH_CHECK_VALUE(n >= 1, "sqz_kernels._C.chain_build: a chain needs at least one step");
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* st = PyList_GET_ITEM(args[0], i);
    TORCH_CHECK_TYPE(PyTuple_Check(st) && PyTuple_GET_SIZE(st) == 3 &&
                         PyUnicode_Check(PyTuple_GET_ITEM(st, 0)) &&
                         PyTuple_Check(PyTuple_GET_ITEM(st, 1)),
                     "sqz_kernels._C.chain_build: step ", i, " must be (op_name, args tuple, view)");
    const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(st, 0));
    if (!name) throw python_error();
    ChainStep step{op_handle(name), {}, {}, false};
    const auto& schema_args = step.op.schema().arguments();
    PyObject* a = PyTuple_GET_ITEM(st, 1);
    TORCH_CHECK_TYPE(static_cast<size_t>(PyTuple_GET_SIZE(a)) == schema_args.size() &&
                         !schema_args.empty() &&
                         schema_args[0].type()->kind() == c10::TypeKind::TensorType,
                     "sqz_kernels._C.chain_build: step ", i, ": sqz_kernels::", name, " takes ",
                     schema_args.size(), " arguments, the first a Tensor; got ",
                     PyTuple_GET_SIZE(a));
    step.args.reserve(schema_args.size());
    step.args.emplace_back();  // the running tensor
    for (size_t j = 1; j < schema_args.size(); ++j)
      step.args.push_back(to_ivalue(PyTuple_GET_ITEM(a, static_cast<Py_ssize_t>(j)), schema_args[j]));
    step.has_view = optional_shape(PyTuple_GET_ITEM(st, 2), step.view, "a step's view");
    chain->steps.push_back(std::move(step));
  }
  chain->has_final_view = optional_shape(args[1], chain->final_view, "final_view");
  if (nargs == 3 && args[2] != Py_None) chain->guard = make_guard(args[2], chain->steps);
  PyObject* cap = PyCapsule_New(chain.get(), kChainCapsule, [](PyObject* c) {
    delete static_cast<Chain*>(PyCapsule_GetPointer(c, kChainCapsule));
  });
  if (!cap) throw python_error();
  chain.release();
  return cap;
  END_HANDLE_TH_ERRORS
}

PyObject* chain_run(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2 && PyCapsule_IsValid(args[0], kChainCapsule),
                   "sqz_kernels._C.chain_run(chain, x): chain must come from chain_build");
  TORCH_CHECK_TYPE(THPVariable_Check(args[1]), "sqz_kernels._C.chain_run: x must be a Tensor");
  const Chain& chain = *static_cast<const Chain*>(PyCapsule_GetPointer(args[0], kChainCapsule));
  at::Tensor x = THPVariable_Unpack(args[1]);
  if (chain.guard && !chain.guard->passes(args[1], x)) Py_RETURN_NOTIMPLEMENTED;
  {
    pybind11::gil_scoped_release no_gil;
    c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset);
    torch::jit::Stack stack;
    for (const ChainStep& step : chain.steps) {
      stack.assign(step.args.begin(), step.args.end());
      stack[0] = step.has_view ? x.view(step.view) : std::move(x);
      step.op.callBoxed(&stack);
      TORCH_INTERNAL_ASSERT(stack.size() == 1 && stack[0].isTensor());
      x = std::move(stack[0]).toTensor();
      stack.clear();
    }
    if (chain.has_final_view) x = x.view(chain.final_view);
  }
  return THPVariable_Wrap(std::move(x));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&call)), METH_FASTCALL,
     "call(op_name, *args): torch.ops.sqz_kernels.<op_name>(*args) below autograd, with a short "
     "argument conversion (see csrc/python_calls.cpp)"},
    {"chain_build", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&chain_build)),
     METH_FASTCALL,
     "chain_build(steps, final_view, guards=None): a chain of op calls for chain_run"},
    {"chain_run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&chain_run)),
     METH_FASTCALL, "chain_run(chain, x): runs a chain_build chain on x (see KernelChain)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
