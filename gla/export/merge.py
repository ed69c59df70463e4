"""Two traced ONNX graphs of one function as one model: a one-token step and a block of tokens, chosen by an If.

ONNX Runtime runs one session per model, and each session holds its own copy of the weights, so two graphs in two
files would load them twice. Here both graphs become the branches of an If on the block's length (T == 1: the step
branch); their weights move to the outer graph, where each distinct tensor is stored once (the branches trace the
same parameters, so their tensors are byte-identical) and both branches read it from the enclosing scope.
"""
from __future__ import annotations

import hashlib


def _rename(graph, prefix: str, outer: set, weights: dict, node_prefix: str | None = None) -> None:
    """Give every value of ``graph`` (and of its subgraphs) ``prefix``, except the outer graph's inputs (``outer``)
    and the weights, which take their shared names (``weights``: old name -> shared name); nodes are named
    ``node_prefix`` (``prefix`` at the top) and their own name, or their position where they have none, so that
    names stay unique across both branches and inside nested subgraphs."""
    import onnx

    def name(n: str) -> str:
        return n if not n or n in outer else weights.get(n, prefix + n)

    node_prefix = prefix if node_prefix is None else node_prefix
    for i, node in enumerate(graph.node):
        node.input[:] = [name(n) for n in node.input]
        node.output[:] = [name(n) for n in node.output]
        node.name = node_prefix + (node.name or f"{node.op_type}_{i}")
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        a.graphs if a.type == onnx.AttributeProto.GRAPHS else []):
                _rename(sub, prefix, outer, weights, node.name + "/")
    for v in [*graph.value_info, *graph.output, *graph.input]:
        v.name = name(v.name)


def all_nodes(graph):
    """Every node of an ONNX graph and of its subgraphs (an If's two branches)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            yield from (n for g in ([a.g] if a.HasField("g") else a.graphs) for n in all_nodes(g))


def merge_step_and_block(step_path: str, block_path: str, out_path: str) -> None:
    """step_path: the graph traced with T = 1; block_path: the same function traced with any T. Both take and
    return the same named values. Writes out_path: one model whose If runs the step graph when ids [B, T] has
    T == 1 and the block graph otherwise, the weights of both stored once."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    step, block = onnx.load(step_path), onnx.load(block_path)
    io = ([i.name for i in block.graph.input], [o.name for o in block.graph.output])
    if ([i.name for i in step.graph.input], [o.name for o in step.graph.output]) != io:
        raise ValueError("the step and block graphs must take and return the same named values")
    if step.functions or block.functions:
        raise ValueError("graphs with local functions are not merged (the exporter inlines them)")
    outer = set(io[0])
    inputs, outputs = [], []  # copies: the branches' own are renamed or removed below
    for src, dst in ((block.graph.input, inputs), (block.graph.output, outputs)):
        for v in src:
            dst.append(onnx.ValueInfoProto())
            dst[-1].CopyFrom(v)
    shared, weights, branches = {}, [], []
    for prefix, model in (("step/", step), ("block/", block)):
        renamed = {}
        for t in model.graph.initializer:
            key = (t.data_type, tuple(t.dims), hashlib.sha1(numpy_helper.to_array(t).tobytes()).hexdigest())
            if key not in shared:
                shared[key] = f"weight_{len(shared)}"
                w = TensorProto()
                w.CopyFrom(t)
                w.name = shared[key]
                weights.append(w)
            renamed[t.name] = shared[key]
        g = model.graph  # loaded for this call alone: edited in place, not copied (it may hold a GiB of weights)
        del g.initializer[:]
        del g.input[:]  # a branch reads the outer graph's inputs; it has none of its own
        _rename(g, prefix, outer, renamed)
        g.name = prefix.rstrip("/")
        branches.append(g)
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Shape", ["ids"], ["ids_length"], start=1, end=2),
             helper.make_node("Constant", [], ["one"], value=one),
             helper.make_node("Equal", ["ids_length", "one"], ["one_token"]),
             helper.make_node("Squeeze", ["one_token"], ["is_step"]),  # If takes a scalar condition
             helper.make_node("If", ["is_step"], io[1], then_branch=branches[0], else_branch=branches[1])]
    graph = helper.make_graph(nodes, "gla", inputs, outputs, weights)
    opsets = {}
    for o in [*step.opset_import, *block.opset_import]:
        opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                               ir_version=block.ir_version)
    onnx.checker.check_model(merged)
    onnx.save(merged, out_path)
