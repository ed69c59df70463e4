"""gla.export.merge: two graphs of one signature behind an If on the block length, each distinct weight once."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from gla.export.merge import merge_step_and_block  # noqa: E402

W = np.arange(6, dtype=np.float32).reshape(2, 3)


def _graph(path, op, weights, out="y"):
    """ids [B, T] int64 -> y [B, T, 3]: Cast, then (ids x 1) MatMul w, then ``op`` with a second weight c."""
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["f", "axis"], ["f3"]),
             helper.make_node("MatMul", ["f3", weights[0]], ["h"]),
             helper.make_node(op, ["h", "c"], [out])]
    inits = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"),
             numpy_helper.from_array(W[:1], weights[0]), numpy_helper.from_array(weights[1], "c")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", "T", 3])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_one_token_takes_the_step_graph_and_weights_are_stored_once(tmp_path):
    c = np.full(3, 2.0, dtype=np.float32)
    _graph(str(tmp_path / "s.onnx"), "Add", ("w_step", c))
    _graph(str(tmp_path / "b.onnx"), "Mul", ("w_block", c))
    merge_step_and_block(str(tmp_path / "s.onnx"), str(tmp_path / "b.onnx"), str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert len(model.graph.initializer) == 3  # axis, w and c shared by both branches though named apart
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    one, block = np.array([[3]], dtype=np.int64), np.array([[3, 4]], dtype=np.int64)
    h1, h2 = one[..., None] * W[:1], block[..., None] * W[:1]
    assert np.allclose(sess.run(None, {"ids": one})[0], h1 + c)  # the step graph (Add)
    assert np.allclose(sess.run(None, {"ids": block})[0], h2 * c)  # the block graph (Mul)


def test_graphs_of_different_signatures_are_refused(tmp_path):
    c = np.ones(3, dtype=np.float32)
    _graph(str(tmp_path / "s.onnx"), "Add", ("w", c), out="y")
    _graph(str(tmp_path / "b.onnx"), "Add", ("w", c), out="logits")
    with pytest.raises(ValueError, match="same named values"):
        merge_step_and_block(str(tmp_path / "s.onnx"), str(tmp_path / "b.onnx"), str(tmp_path / "m.onnx"))
