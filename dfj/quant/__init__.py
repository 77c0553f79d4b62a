"""Quantizers (GPTQ, GGUF k-quants, ONNX int8/int4) register their `--quant` names in
`dfj.export.FORMATS`; their code lives here, one module per method."""
