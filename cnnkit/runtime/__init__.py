"""The torch-free inference room: onnxruntime + numpy + a PNG decoder, nothing else.

    cnnkit.runtime.session   create_session(): provider choice, metadata and input checks, run()
    cnnkit.runtime.openvino  the same session on OpenVINO's CPU device (`pip install 'cnnkit[openvino]'`)
    cnnkit.runtime.backends  create_session(..., backend=): either of them; openvino's first-use parity check
    cnnkit.runtime.infer     infer(): folder -> predictions CSV, accuracy; format_summary()
    cnnkit.runtime.shard     --shard K/N: which files a shard keeps, its summary; merge() of the shards
    cnnkit.runtime.outputs   the files infer writes and merge reads: names and columns

Imports run one way: predictor -> infer -> backends -> shard -> outputs; backends -> openvino -> session.

Nothing here (nor in the core modules it uses) imports torch, torchvision or onnx, so a machine with
only `pip install 'cnnkit[cpu]'` can classify folders; `tests/test_runtime.py` proves it in a fresh
interpreter. (No re-exports here: `cnnkit.runtime.infer` stays the module, not the function.)
"""
