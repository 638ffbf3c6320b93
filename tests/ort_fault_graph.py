"""A tiny ONNX graph that onnxruntime refuses or fails to run on demand, for real (no raise injected in
Python).

``x`` float32 [3] -> ``y`` = x + 1; ``n`` int64 [1] -> ``total`` = the sum of ``n`` ones, which onnxruntime
allocates first. ``x`` of another length is refused by onnxruntime's own feed check (its ``InvalidArgument``);
``n`` = :data:`HUGE` asks for 512 TiB, which no machine here has: the allocation fails at run time (``Fail``).
"""

from __future__ import annotations

from pathlib import Path

HUGE = 1 << 47  # float32 elements: 512 TiB


def write_fault_graph(path: Path) -> Path:
    import onnx  # noqa: PLC0415 - test helper, only when asked
    from onnx import TensorProto, helper  # noqa: PLC0415

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "one"], ["y"]),
            helper.make_node(
                "ConstantOfShape",
                ["n"],
                ["ones"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
            ),
            helper.make_node("ReduceSum", ["ones"], ["total"], keepdims=1),
        ],
        "ort_fault",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
