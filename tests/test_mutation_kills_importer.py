"""`edgeconv import`'s reading of a foreign graph and of the user's flags (export/edgeconv_export/importer.py), on real
ONNX graphs built here with onnx.helper and run by ONNX Runtime: layout and channel detection, dynamic dimensions, the
refusals of what is not a one-input image classifier, labels files, --size/--mean/--std parsing, and the graph
rewrites (Softmax removed, log of probabilities). In-process and torch-free, so `make mutants` runs it once per
mutant in seconds; tests/test_import.py imports real torchvision models end to end."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeconv_export import importer as imp
from edgeconv_export.importer import (GraphInfo, ImportRequest, _check_size, _layout, _size, as_logits, build_preprocess, check_request,
                                      default_precisions, inspect_graph, load_source, parse_floats, parse_size, read_labels,
                                      source_outputs, to_source_layout)
from edgeconv_runtime.errors import EdgeconvError


def classifier(in_dims, out_dims=("n", 2), softmax=False, axis=None, elem=TensorProto.FLOAT, opset=17, extra_inputs=0,
               extra_outputs=0, nhwc=False):
    """A real image classifier graph: mean over H, W (of NCHW or NHWC), then a 2-class MatMul (and a Softmax)."""
    c = in_dims[3] if nhwc else in_dims[1]
    c = c if isinstance(c, int) else 3
    w = np.arange(c * 2, dtype=np.float32).reshape(c, 2) / 10 - 0.2
    nodes = [helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[1, 2] if nhwc else [2, 3], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], ["scores" if softmax else "logits"])]
    if softmax:
        kw = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("Softmax", ["scores"], ["logits"], **kw))
    inputs = [helper.make_tensor_value_info("x", elem, list(in_dims))]
    inputs += [helper.make_tensor_value_info(f"extra{i}", TensorProto.FLOAT, [1]) for i in range(extra_inputs)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_dims))]
    outputs += [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", c]) for _ in range(extra_outputs)]
    g = helper.make_graph(nodes, "g", inputs, outputs, [helper.make_tensor("w", TensorProto.FLOAT, [c, 2], w.ravel())])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset if opset < 18 else 17)], ir_version=8)


def info(dims, layout="nchw", name="x") -> GraphInfo:
    return GraphInfo(name, list(dims), layout, "logits", 2, False, 17, 8)


def test_layout_from_the_channel_axis_or_from_the_flag():
    assert _layout([None, 3, 224, 224], None, "x") == "nchw"
    assert _layout([None, 1, 28, 28], None, "x") == "nchw"
    assert _layout([None, 224, 224, 3], None, "x") == "nhwc"
    assert _layout([None, 28, 28, 1], None, "x") == "nhwc"
    with pytest.raises(EdgeconvError, match=r"cannot tell the layout of input 'x' with shape \[\?, 3, 3, 3\]; pass --layout"):
        _layout([None, 3, 3, 3], None, "x")
    with pytest.raises(EdgeconvError, match="cannot tell the layout"):
        _layout([None, 5, 224, 224 * 2], None, "x")
    assert _layout([None, 3, 3, 3], "nhwc", "x") == "nhwc" and _layout([None, None, 8, 8], "nchw", "x") == "nchw"
    assert _layout([None, 1, 8, 3], "nchw", "x") == "nchw"
    with pytest.raises(EdgeconvError, match=r"has shape \[\?, 3, 8, 8\], which has 8 channels in NHWC"):
        _layout([None, 3, 8, 8], "nhwc", "x")
    with pytest.raises(EdgeconvError, match="which has 4 channels in NCHW"):
        _layout([None, 4, 8, 3], "nchw", "x")


def test_inspect_graph_reads_a_real_classifier():
    i = inspect_graph(classifier([1, 3, 32, 48]))
    assert (i.input_name, i.input_dims, i.layout, i.output_name, i.num_classes, i.ends_in_softmax) == ("x", [1, 3, 32, 48], "nchw", "logits", 2, False)
    assert i.channels == 3 and i.spatial == (32, 48) and i.opset == 17 and i.ir_version == 8
    i = inspect_graph(classifier(["n", 40, 24, 1], out_dims=["n", 2], nhwc=True))
    assert i.layout == "nhwc" and i.channels == 1 and i.spatial == (40, 24) and i.input_dims == [None, 40, 24, 1] and i.num_classes == 2
    assert inspect_graph(classifier([1, 3, 8, 8], softmax=True)).ends_in_softmax
    assert inspect_graph(classifier([1, 3, 8, 8], softmax=True, axis=1)).ends_in_softmax
    assert inspect_graph(classifier([1, 3, 8, 8], softmax=True, axis=-1)).ends_in_softmax
    assert not inspect_graph(classifier([1, 3, 8, 8], softmax=True, axis=0)).ends_in_softmax  # over the batch: not a class softmax
    assert inspect_graph(classifier([1, 3, 8, 8], opset=11)).opset == 11
    named = classifier([1, 3, 8, 8], opset=13)
    named.opset_import[0].domain = "ai.onnx"  # the default domain by its full name
    assert inspect_graph(named).opset == 13
    other = classifier([1, 3, 8, 8], opset=13)
    other.opset_import[0].domain = "ai.onnx.ml"  # no default-domain opset declared: 0, "too old", upgraded later
    assert inspect_graph(other).opset == 0


@pytest.mark.parametrize("kw, needle", [
    ({"in_dims": [1, 3, 8, 8], "extra_inputs": 1}, "the model has 2 inputs (x, extra0)"),
    ({"in_dims": [1, 3, 8, 8], "elem": TensorProto.DOUBLE}, "input 'x' is float64, not float32"),
    ({"in_dims": [1, 3, 8]}, r"input 'x' has shape [1, 3, 8], not an image batch"),
    ({"in_dims": [1, 3, 8, 8], "extra_outputs": 1}, "the model has 2 outputs (logits, pooled)"),
    ({"in_dims": [1, 3, 8, 8], "out_dims": [1, 2, 1]}, "output 'logits' has shape [1, 2, 1], not [N, classes]"),
    ({"in_dims": [1, 4, 8, 8]}, "cannot tell the layout"),
])
def test_inspect_graph_refuses_what_is_not_an_image_classifier(kw, needle):
    with pytest.raises(EdgeconvError) as e:
        inspect_graph(classifier(**kw))
    assert needle in str(e.value)


def test_a_channel_axis_the_graph_leaves_open_is_refused():
    with pytest.raises(EdgeconvError, match="input 'x' has None channels; edgeconv takes 1 .grayscale. or 3"):
        inspect_graph(classifier(["n", "c", 8, 8]), "nchw")
    with pytest.raises(EdgeconvError, match="has None channels"):
        inspect_graph(classifier(["n", 8, 8, "c"], nhwc=True), "nhwc")


def test_initializers_listed_as_inputs_are_not_inputs():
    m = classifier([1, 3, 8, 8])
    m.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]))  # old IR: weights listed as inputs
    assert inspect_graph(m).input_name == "x"


def test_load_source_opens_declared_minus_one_and_zero_dims(tmp_path):
    m = classifier([1, 3, 8, 8])
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, (-1, 3, 0, 8)):
        d.dim_value = v
    out_dim = m.graph.output[0].type.tensor_type.shape.dim[0]
    out_dim.dim_value = 1
    onnx.save(m, str(tmp_path / "m.onnx"))
    src = load_source(str(tmp_path / "m.onnx"))
    assert inspect_graph(src).input_dims == [None, 3, None, 8]
    assert [d.HasField("dim_value") for d in src.graph.input[0].type.tensor_type.shape.dim] == [False, True, False, True]
    assert src.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 1  # 1 is a real size, kept
    with pytest.raises(EdgeconvError, match="ONNX file not found"):
        load_source(str(tmp_path / "none.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(EdgeconvError, match="junk.onnx is not a readable ONNX model|junk.onnx holds no graph nodes"):
        load_source(str(tmp_path / "junk.onnx"))
    empty = helper.make_model(helper.make_graph([], "g", [], []))
    onnx.save(empty, str(tmp_path / "empty.onnx"))
    with pytest.raises(EdgeconvError, match="empty.onnx holds no graph nodes"):
        load_source(str(tmp_path / "empty.onnx"))


def test_load_source_infers_an_output_shape_left_out(tmp_path):
    m = classifier([1, 3, 8, 8])
    m.graph.output[0].type.tensor_type.ClearField("shape")
    onnx.save(m, str(tmp_path / "m.onnx"))
    assert inspect_graph(load_source(str(tmp_path / "m.onnx"))).num_classes == 2


def test_labels_file_rules(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text(" cat \ndog\n\n\n")
    assert read_labels(str(f), 2) == ["cat", "dog"] and read_labels(str(f), None) == ["cat", "dog"]
    with pytest.raises(EdgeconvError, match=r"has 2 class names but the model outputs 3 classes; give one name a line, 3 lines"):
        read_labels(str(f), 3)
    with pytest.raises(EdgeconvError, match=r"pass --labels FILE with one class name a line \(2 lines for this model\)"):
        read_labels(None, 2)
    with pytest.raises(EdgeconvError) as e:
        read_labels("", None)
    assert str(e.value).endswith("one class name a line")
    f.write_text("cat\n\ndog\n")
    with pytest.raises(EdgeconvError, match="has empty lines"):
        read_labels(str(f), 2)
    f.write_text("\n")
    with pytest.raises(EdgeconvError, match="has empty lines"):
        read_labels(str(f), None)
    f.write_text("cat\ndog\ncat\n")
    with pytest.raises(EdgeconvError, match="names class 'cat' twice"):
        read_labels(str(f), 3)
    f.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(EdgeconvError, match="cannot read labels file .*UnicodeDecodeError"):
        read_labels(str(f), 1)


def test_size_mean_std_parsing():
    assert parse_size("128") == (128, 128) and parse_size("128x96") == (128, 96) and parse_size("128,96") == (128, 96)
    assert parse_size((32, 48)) == (32, 48) and parse_size(7) == (7, 7) and parse_size(None) is None and parse_size("1,1") == (1, 1)
    for bad in ("0,5", "5,0", "1.5,2", "1,2,3", "a,b", ""):
        with pytest.raises(EdgeconvError, match="--size must be "):
            parse_size(bad)
    assert parse_floats("0.5, 0.25,1", "--mean") == (0.5, 0.25, 1.0) and parse_floats(None, "--mean") is None
    assert parse_floats((1.0,), "--mean") == (1.0,) and parse_floats([1, 2], "--std") == (1.0, 2.0) and parse_floats(0.5, "--std") == (0.5,)
    with pytest.raises(EdgeconvError, match=r"--std must be a comma list of numbers, got 'a,b'"):
        parse_floats("a,b", "--std")
    req = ImportRequest("m.onnx", "out", size="64", mean="0.5", std="0.25", precisions="FP32, int8,")
    assert req.size == (64, 64) and req.mean == (0.5,) and req.std == (0.25,) and req.precisions == ("fp32", "int8")


def test_size_from_the_graph_or_the_flag():
    assert _size(info([1, 3, 32, 48]), None) == (32, 48) and _size(info([1, 3, 32, 48]), (32, 48)) == (32, 48)
    with pytest.raises(EdgeconvError, match="--size 32,32 disagrees with the graph's input size 32,48; drop --size"):
        _size(info([1, 3, 32, 48]), (32, 32))
    with pytest.raises(EdgeconvError, match=r"has dynamic height/width \[1, 3, \?, \?\]; pass --size H,W"):
        _size(info([1, 3, None, None]), None)
    assert _size(info([1, 3, None, None]), (20, 30)) == (20, 30)
    assert _size(info([1, 3, 20, None]), (20, 30)) == (20, 30)
    with pytest.raises(EdgeconvError, match=r"--size 21,30 disagrees with the graph's input \[1, 3, 20, \?\]"):
        _size(info([1, 3, 20, None]), (21, 30))
    assert _size(info([1, None, 20, 3], "nhwc"), (21, 20)) == (21, 20)
    with pytest.raises(EdgeconvError, match="disagrees"):
        _size(info([1, None, 20, 3], "nhwc"), (21, 21))


def test_absurd_sizes_are_refused_before_any_image_is_read():
    _check_size(info([1, 3, 224, 224]), (224, 224), None)
    with pytest.raises(EdgeconvError, match=r"input 'x' declares \[1, 3, 100000, 8\]: .*fix the graph's input shape"):
        _check_size(info([1, 3, 100000, 8]), (100000, 8), None)
    with pytest.raises(EdgeconvError, match=r"--size 100000,8 makes input 'x' \[\?, 3, 100000, 8\]: .*pass a smaller --size"):
        _check_size(info([None, 3, None, None]), (100000, 8), (100000, 8))
    with pytest.raises(EdgeconvError, match=r"makes input 'x' \[\?, 100000, 8, 3\]"):
        _check_size(info([None, None, None, 3], "nhwc"), (100000, 8), (100000, 8))
    with pytest.raises(EdgeconvError, match="declares"):  # --size equal to a fixed graph: the graph's own shape is absurd
        _check_size(info([1, 3, 100000, 8]), (100000, 8), (100000, 8))


def test_preprocess_from_the_flags():
    req = lambda **kw: ImportRequest("m.onnx", "out", **kw)
    p = build_preprocess(req(mean="0.485,0.456,0.406", std="0.229,0.224,0.225"), 3, (32, 48))
    assert p.size == (32, 48) and p.channels == 3 and p.resize == "stretch" and p.scale == 1 / 255 and p.mean == (0.485, 0.456, 0.406)
    p = build_preprocess(req(mean="0.5,0.5,0.5", std="0.2,0.2,0.2", resize="letterbox", scale=1.0), 1, (8, 8))
    assert p.mean == (0.5,) and p.std == (0.2,) and p.resize == "letterbox" and p.scale == 1.0  # one grey value for all three
    with pytest.raises(EdgeconvError, match="1-channel images: --mean and --std need 1 values each, got 3 and 3"):
        build_preprocess(req(mean="0.5,0.4,0.5", std="0.2,0.2,0.2"), 1, (8, 8))
    with pytest.raises(EdgeconvError, match="got 3 and 3"):
        build_preprocess(req(mean="0.5,0.5,0.5", std="0.2,0.3,0.2"), 1, (8, 8))
    with pytest.raises(EdgeconvError, match="3-channel images: --mean and --std need 3 values each, got 3 and 1"):
        build_preprocess(req(mean="0,0,0", std="1"), 3, (8, 8))
    with pytest.raises(EdgeconvError, match="--std values must not be 0"):
        build_preprocess(req(mean="0,0,0", std="1,0,1"), 3, (8, 8))
    for kw in ({"mean": "0,0,0"}, {"std": "1,1,1"}):
        with pytest.raises(EdgeconvError, match="pass --mean and --std"):
            build_preprocess(req(**kw), 3, (8, 8))


def test_request_checks_and_default_precisions(tmp_path):
    req = lambda **kw: ImportRequest("m.onnx", str(tmp_path / "out"), **{"val_data": "v", **kw})
    assert default_precisions(req()) == ("fp32", "fp16") and default_precisions(req(calib_data="c")) == ("fp32", "fp16", "int8")
    assert default_precisions(req(precisions="fp32")) == ("fp32",)
    check_request(req())
    check_request(req(val_data=None, calib_data="c"))
    check_request(req(layout="nhwc", output="probabilities", channel_order="bgr"))
    for kw, needle in (({"channel_order": "brg"}, "unknown --channel-order 'brg'"), ({"layout": "chw"}, "unknown --layout 'chw'"),
                       ({"output": "scores"}, "unknown --output 'scores'"), ({"val_data": None}, "pass --val-data DIR or --calib-data"),
                       ({"precisions": "fp32,int8"}, "INT8 needs calibration images")):
        with pytest.raises(EdgeconvError, match=needle):
            check_request(req(**kw))
    (tmp_path / "out").mkdir()
    with pytest.raises(EdgeconvError, match="already exists; pass --force"):
        check_request(req())
    check_request(req(force=True))


def test_source_layout_and_logits_rewrites_run_in_onnx_runtime():
    x = np.random.default_rng(0).random((3, 3, 4, 4), dtype=np.float32)
    x[:, 0] += 1.0  # channels differ in mean: a flip or a transpose shows in the logits
    nchw = info([None, 3, 4, 4])
    assert np.array_equal(to_source_layout(x, nchw, "rgb"), x)
    assert np.array_equal(to_source_layout(x, nchw, "bgr"), x[:, ::-1])
    t = to_source_layout(x, info([None, 4, 4, 3], "nhwc"), "bgr")
    assert t.shape == (3, 4, 4, 3) and t.flags["C_CONTIGUOUS"] and np.array_equal(t, x[:, ::-1].transpose(0, 2, 3, 1))
    gray = x[:, :1]
    assert np.array_equal(to_source_layout(gray, info([None, 1, 4, 4]), "bgr"), gray)  # one channel: nothing to flip
    # the graph's logits, its Softmax removed, and the log of probabilities from elsewhere all give the same softmax
    plain = source_outputs(classifier([None, 3, 4, 4], out_dims=["n", 2]), "x", x)
    soft = classifier([None, 3, 4, 4], out_dims=["n", 2], softmax=True)
    i = inspect_graph(soft)
    probs = source_outputs(soft, "x", x)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    removed = source_outputs(as_logits(soft, i, "probabilities"), "x", x)
    np.testing.assert_allclose(removed, plain, rtol=1e-6)
    soft2 = classifier([None, 3, 4, 4], out_dims=["n", 2], softmax=True)
    i2 = inspect_graph(soft2)
    i2.ends_in_softmax = False  # as if the probabilities came from elsewhere: log() appended
    logp = source_outputs(as_logits(soft2, i2, "probabilities"), "x", x)
    np.testing.assert_allclose(logp, np.log(probs), rtol=1e-5)
    assert "log" in i2.notes[0] and "Softmax: removed" in i.notes[0]
    kept = classifier([None, 3, 4, 4], softmax=True)
    assert as_logits(kept, inspect_graph(kept), "logits") is kept and len(kept.graph.node) == 3


def test_source_outputs_pads_a_fixed_batch_and_says_why_ort_fails():
    x = np.ones((3, 3, 4, 4), np.float32)
    fixed = classifier([2, 3, 4, 4], out_dims=[2, 2])
    out = source_outputs(fixed, "x", x, fixed_batch=2)
    assert out.shape == (3, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.repeat(out[:1], 3, 0))
    out1 = source_outputs(classifier([None, 3, 4, 4]), "x", x, batch_size=2)
    assert out1.shape == (3, 2)
    with pytest.raises(EdgeconvError) as e:
        source_outputs(fixed, "x", x, batch_size=3)
    # one line: the first of ONNX Runtime's (which goes on with the indices and a hint)
    assert str(e.value).startswith("ONNX Runtime cannot run the model: [ONNXRuntimeError]") and "invalid dimensions" in str(e.value)
    assert "\n" not in str(e.value)
    assert imp.LOG_FLOOR == 1e-30
