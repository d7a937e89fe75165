"""Attention the onnxruntime optimizer leaves unfused, as one MultiHeadAttention node each (text encoders, VAEs).

- Text encoders: onnxruntime's CLIP fusion (``fusion_attention_clip.py``) recognises the causal mask only as
  older transformers built it (``Where(Less(...))`` into an ``Expand``). transformers 5 builds it in
  ``masking_utils`` from a Range and LessOrEqual, so it fused no attention in our text encoders.
- VAEs: diffusers' attention exports through ``scaled_dot_product_attention``, which the TorchScript exporter
  writes with Q and K each multiplied by ``sqrt(scale)`` (computed from shapes); onnxruntime's VAE fusion matches
  only the older processor's pattern (ONNX Runtime's own pipeline deletes the SDPA function while it exports).

Each layer keeps two MatMuls, the scaling, the mask's Add, a Softmax and the transposes around them, where one
fused kernel would do (flash or memory-efficient attention on CUDA; at a 64x64 latent the VAE's unfused scores
are 4096x4096 per image). This pass makes that one node, ``com.microsoft.MultiHeadAttention(q, k, v)``, with
the graph's own scale and ``unidirectional=1`` where the mask is causal.

Nothing is assumed from the pattern alone. The original graph is run once on the CPU with the mask, the scale's
factors and the per-head query as extra outputs: each scale factor must be a scalar, a mask must be exactly causal
(0 on and below the diagonal, hugely negative above; any other mask is left alone), and the head count comes from
the query's shape. Then the fused graph is run on the same inputs and must give the original's outputs (same
shapes, within float32 rounding); otherwise, or where onnxruntime cannot run it, the original is kept.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx

from ..engine.errors import first_line

log = logging.getLogger(__name__)

MHA = "/sdturbo_mha"  # suffix of the fused nodes' names
# the fused graph against the original, float32 on the CPU: the largest difference over the largest value.
# Measured (random weights, x86-64): 0.0 on SD-Turbo's full-size text encoder (the same kernels, the same sums),
# 2e-6 on its full-size VAE decoder at a 32x32 latent (1024 tokens, summed in another order); a scale 1% off moves
# the text encoder by 1e-4, a missing causal mask by ~1. Over the bar, the graph is left unfused (a warning).
TOLERANCE = 1e-5


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph) -> dict:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _const(graph, name: str):
    """The value of ``name`` if it is an initializer or a Constant node's output, else None."""
    for t in graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    node = _producers(graph).get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return onnx.numpy_helper.to_array(a.t)
    return None


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _head_input(producers, name: str, perm: list[int]) -> tuple[str, str] | None:
    """``name`` = Transpose(perm)(Reshape(x, [B, S, heads, head_size])): (x, the Reshape's output)."""
    t = producers.get(name)
    if t is None or t.op_type != "Transpose" or _perm(t) != perm:
        return None
    r = producers.get(t.input[0])
    if r is None or r.op_type != "Reshape":
        return None
    return r.input[0], r.output[0]


def _scalars(producers, graph, name: str) -> tuple[str, list[str]]:
    """Peel ``Mul(x, scalar)`` nodes off ``name``: (x, the scalars' tensor names). A scalar is a constant, or a
    tensor the graph computes from shapes (SDPA's exported ``sqrt(1/sqrt(head_size))``), checked by a run."""
    factors = []
    node = producers.get(name)
    while node is not None and node.op_type == "Mul":
        sizes = [_const(graph, i) for i in node.input]
        # the factor: the constant one, else the one not made by the attention's own nodes (a shape computation)
        i = next((i for i, v in enumerate(sizes) if v is not None and v.size == 1), None)
        if i is None:
            kinds = [getattr(producers.get(x), "op_type", "") for x in node.input]
            i = next((i for i, k in enumerate(kinds) if k in ("Sqrt", "Div", "Cast", "Reciprocal")), None)
        if i is None:
            break
        factors.append(node.input[i])
        name = node.input[1 - i]
        node = producers.get(name)
    return name, factors


def find(graph) -> list[dict]:
    """Each attention in ``graph`` that reads ``Transpose(Reshape(x))`` heads: ``softmax(scale * Q K^T [+ mask])
    V``, the scale as constant or computed factors on the scores or on Q and K, the softmax maybe cast to float and
    back, then ``Reshape(Transpose(.))``: as the tensors the fused node needs (unverified)."""
    producers, consumers, found = _producers(graph), _consumers(graph), []
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        scores, mask = sm.input[0], None
        add = producers.get(scores)
        if add is not None and add.op_type == "Add":  # an additive mask on the scores
            chain = [i for i in add.input if getattr(producers.get(i), "op_type", "") in ("Mul", "MatMul")]
            if len(chain) != 1:
                continue
            scores, mask = chain[0], next(i for i in add.input if i != chain[0])
        scores, factors = _scalars(producers, graph, scores)
        qk = producers.get(scores)
        if qk is None or qk.op_type != "MatMul":
            continue
        q_in, q_factors = _scalars(producers, graph, qk.input[0])
        k_in, k_factors = _scalars(producers, graph, qk.input[1])
        nxt, last = consumers.get(sm.output[0], []), sm
        while len(nxt) == 1 and nxt[0].op_type == "Cast":  # softmax in float32, cast back: identities here
            if next(a.i for a in nxt[0].attribute if a.name == "to") != onnx.TensorProto.FLOAT:
                break
            last, nxt = nxt[0], consumers.get(nxt[0].output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "MatMul" or nxt[0].input[0] != last.output[0]:
            continue
        pv = nxt[0]
        q, k, v = (
            _head_input(producers, q_in, [0, 2, 1, 3]),
            _head_input(producers, k_in, [0, 2, 3, 1]),
            _head_input(producers, pv.input[1], [0, 2, 1, 3]),
        )
        after = consumers.get(pv.output[0], [])
        if None in (q, k, v) or len(after) != 1 or after[0].op_type != "Transpose" or _perm(after[0]) != [0, 2, 1, 3]:
            continue
        merge = consumers.get(after[0].output[0], [])
        if len(merge) != 1 or merge[0].op_type != "Reshape":
            continue
        found.append(
            {
                "name": sm.name.rsplit("/", 1)[0] + MHA,
                "q": q[0],
                "k": k[0],
                "v": v[0],
                "q_heads": q[1],  # [B, S, heads, head_size]: the head count
                "mask": mask,
                "factors": [*factors, *q_factors, *k_factors],  # their product: the scale
                "output": merge[0].output[0],
                "replaced": merge[0],
            }
        )
    return found


def _run(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    """Every output of the graph at ``path``, on the CPU, as written (no graph optimizations)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return dict(zip((o.name for o in sess.get_outputs()), sess.run(None, feeds), strict=True))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))  # the weights stay where they are: embedded, or external beside ``path``
    return path


def _causal(mask: np.ndarray) -> bool:
    s = mask.shape[-1]
    if mask.ndim != 4 or mask.shape[-2] != s or mask.shape[1] != 1:
        return False
    below = np.tril(np.ones((s, s), bool))
    return bool(np.all(mask[..., below] == 0) and np.all(mask[..., ~below] <= -1e4))


def _prune(graph) -> None:
    """Drop the nodes nothing reads any more (the attention's old nodes)."""
    wanted = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in wanted for o in node.output):
            keep.append(node)
            wanted.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))


def check_feeds(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> dict:
    """Inputs for the checks, from ``model``'s own inputs. ``dims``: each symbolic axis's value (engine/spec.py
    ``axis_values``; default: batch 2, a 256x256 image and its 32x32 latent at scale 8: 1024 tokens in the VAE's
    attention); any other free axis 32. Token ids within every embedding table the graph gathers from (the smallest
    one's size bounds them); floats standard normal."""
    from ..engine.spec import axis_values

    axes = dims or axis_values(2, 256, 256, 8)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    gathered = (inits.get(n.input[0], []) for n in model.graph.node if n.op_type == "Gather")
    vocab = min((d[0] for d in gathered if len(d) == 2), default=256)
    rng = np.random.default_rng(0)
    feeds = {}
    for v in (i for i in model.graph.input if i.name not in inits):
        shape = [d.dim_value or axes.get(d.dim_param, 32) for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[v.name] = rng.integers(0, vocab, shape).astype(dtype)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def fuse_file(src: Path, work: Path, dims: dict[str, int] | None = None) -> tuple[onnx.ModelProto | None, int]:
    """Fuse the attentions of the fp32 graph at ``src`` (a text encoder, a VAE) into MultiHeadAttention nodes when
    the checks in the module doc pass. Returns the fused graph, its weights not loaded (external data, if any,
    still to be read from ``src``'s folder: ``onnx.load_external_data_for_model``), and how many attentions were
    fused; (None, 0) when nothing was. ``work``: an empty folder for the check runs, where ``src``'s external
    weights, if any, are copied (onnxruntime refuses external data through a symlink that leaves the model's
    folder, and onnx refuses a hard-linked file as a possible attack). ``dims``: the checks' input sizes
    (``check_feeds``)."""
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    found = find(graph)
    if not found:
        return None, 0
    feeds = check_feeds(model, dims)
    for t in graph.initializer:  # external weights: copied beside the graphs written here (see above)
        for entry in t.external_data:
            if entry.key == "location" and not (work / entry.value).exists():
                (work / entry.value).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.parent / entry.value, work / entry.value)
    reference = _run(src, feeds)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = {t for f in found for t in (f["mask"], f["q_heads"], *f["factors"]) if t and _const(graph, t) is None}
    for name in sorted(wanted):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        values = _run(_save(probe, work / "probe.onnx"), feeds)
    except Exception as e:  # onnxruntime's own exception types (none derives from RuntimeError)
        why = f"{type(e).__name__}: {first_line(e)}"
        log.warning("%s: onnxruntime cannot read the attentions' tensors (%s); left unfused", src.name, why)
        return None, 0

    def value(name):
        const = _const(graph, name)
        return values[name] if const is None else const

    for f in found:
        factors = [value(t) for t in f["factors"]]
        if not factors or any(v.size != 1 for v in factors):
            log.warning("%s: its scale is not a product of scalars; the attention is left unfused", f["name"])
            return None, 0
        f["scale"] = float(np.prod([float(v.reshape(())) for v in factors]))
        f["causal"] = f["mask"] is not None
        if f["causal"] and not _causal(value(f["mask"])):
            log.warning("%s: its mask is not causal; the attention is left unfused", f["name"])
            return None, 0
    replaced = {f["replaced"].output[0]: f for f in found}
    nodes = []
    for node in graph.node:
        f = replaced.get(node.output[0]) if node.output else None
        if f is None:
            nodes.append(node)
            continue
        heads = int(value(f["q_heads"]).shape[2])
        nodes.append(
            onnx.helper.make_node(
                "MultiHeadAttention",
                [f["q"], f["k"], f["v"]],
                [f["output"]],
                name=f["name"],
                domain="com.microsoft",
                num_heads=heads,
                scale=f["scale"],
                unidirectional=int(f["causal"]),
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    _prune(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    try:
        got = _run(_save(model, work / "fused.onnx"), feeds)
    except Exception as e:  # a fused graph onnxruntime refuses or cannot run is not used either
        why = f"{type(e).__name__}: {first_line(e)}"
        log.warning("onnxruntime cannot run the fused %s (%s): its attentions are left unfused", src.name, why)
        return None, 0
    for name, want in reference.items():
        if got[name].shape != want.shape:  # (a difference would broadcast)
            log.warning("fused attention changes the shape of %s: left unfused", name)
            return None, 0
        err = float(np.max(np.abs(want.astype(np.float64) - got[name]))) / max(float(np.max(np.abs(want))), 1e-30)
        if not err <= TOLERANCE:
            log.warning("fused attention moves %s by %.2g of its largest value (over %g): left unfused", name, err,
                        TOLERANCE)  # fmt: skip
            return None, 0
        log.info("fused attention: %s within %.2g of the original's largest value", name, err)
    return model, len(found)
