#!/usr/bin/env python3
"""Convert a CTranslate2 Whisper model (faster-whisper layout) to whisper.cpp's ggml format.

Standard library only. Usage:
    ct2_to_ggml.py [--q8_0] MODEL_BIN VOCABULARY_TXT OUT_GGML

--q8_0 stores the 2-D weight matrices (attention, MLP, token embedding) as ggml's Q8_0 (blocks of
32 weights: one f16 scale d = max|w| / 127 and 32 int8 round(w / d), ggml's
quantize_row_q8_0_ref), hparams ftype 2007 (GGML_FTYPE_MOSTLY_Q8_0 7 + GGML_QNT_VERSION 2 x 1000),
as whisper.cpp's quantize tool writes it; convolutions stay f16, biases, norms and positional
embeddings f32.

Input  (CTranslate2 model.bin, spec version >= 5): u32 version; u16-length NUL-terminated spec name;
u32 revision; u32 variable count; per variable: u16-length name, u8 rank, rank x u32 dims, u8 dtype
(0 f32, 1 i8, 2 i16, 3 i32, 4 f16), u32 byte count, little-endian data.
Output (ggml, as whisper.cpp's models/convert-pt-to-ggml.py writes it): magic 0x67676d6c, 11 i32
hparams, the 80-bin Slaney mel filterbank (sr 16 kHz, n_fft 400), the byte-level vocabulary without
special tokens, then the tensors in the order of OpenAI's Whisper state dict.
"""
import math
import struct
import sys


def read_ct2(path):
    data = open(path, "rb").read()
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    (version,) = take("<I")
    if version < 5:
        sys.exit(f"unsupported CTranslate2 model version {version}")
    (n,) = take("<H")
    spec = data[pos : pos + n - 1].decode()
    pos += n
    if spec != "WhisperSpec":
        sys.exit(f"not a Whisper model: spec {spec!r}")
    take("<I")  # spec revision
    (count,) = take("<I")
    variables = {}
    for _ in range(count):
        (n,) = take("<H")
        name = data[pos : pos + n - 1].decode()
        pos += n
        (rank,) = take("<B")
        dims = take(f"<{rank}I")
        (dtype,) = take("<B")
        (nbytes,) = take("<I")
        variables[name] = (dims, dtype, data[pos : pos + nbytes])
        pos += nbytes
    return variables


def scalar(variables, name):
    dims, dtype, raw = variables[name]
    fmt = {0: "<f", 1: "<b", 2: "<h", 3: "<i"}[dtype]
    return struct.unpack(fmt, raw)[0]


def f16_to_f32(raw):
    n = len(raw) // 2
    return struct.pack(f"<{n}f", *struct.unpack(f"<{n}e", raw))


def slaney_mel_filterbank(sr=16000, n_fft=400, n_mels=80):
    """librosa.filters.mel(sr, n_fft, n_mels, htk=False, norm='slaney') as float32, reproducing
    librosa's arithmetic (float64, weights stored as float32 before the norm multiply)."""
    f32 = lambda x: struct.unpack("<f", struct.pack("<f", x))[0]
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0

    def hz_to_mel(f):
        return min_log_mel + math.log(f / min_log_hz) / logstep if f >= min_log_hz else f / f_sp

    def mel_to_hz(m):
        return min_log_hz * math.exp(logstep * (m - min_log_mel)) if m >= min_log_mel else f_sp * m

    val = 1.0 / (n_fft * (1.0 / sr))
    fftfreqs = [i * val for i in range(n_fft // 2 + 1)]
    lo, hi = hz_to_mel(0.0), hz_to_mel(sr / 2.0)
    num = n_mels + 2
    step = (hi - lo) / (num - 1)
    mels = [i * step + lo for i in range(num)]
    mels[-1] = hi
    mel_f = [mel_to_hz(m) for m in mels]
    fdiff = [mel_f[i + 1] - mel_f[i] for i in range(num - 1)]
    rows = []
    for i in range(n_mels):
        enorm = 2.0 / (mel_f[i + 2] - mel_f[i])
        row = []
        for f in fftfreqs:
            lower = -(mel_f[i] - f) / fdiff[i]
            upper = (mel_f[i + 2] - f) / fdiff[i + 1]
            w = f32(max(0.0, min(lower, upper)))
            row.append(f32(w * enorm))
        rows.append(row)
    return rows


def byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def openai_tensors(v, n_enc, n_dec):
    """Yield (name, dims, dtype, raw) in OpenAI Whisper's state-dict order (module registration order)."""

    def split(name, parts):
        dims, dtype, raw = v[name]
        rows = dims[0] // parts
        size = len(raw) // parts
        return [((rows,) + tuple(dims[1:]), dtype, raw[i * size : (i + 1) * size]) for i in range(parts)]

    def attn(prefix, src, fused_qkv):
        if fused_qkv:
            q_w, k_w, v_w = split(f"{src}/linear_0/weight", 3)
            q_b, _, v_b = split(f"{src}/linear_0/bias", 3)
            out = "linear_1"
            yield from [(f"{prefix}.query.weight",) + q_w, (f"{prefix}.query.bias",) + q_b,
                        (f"{prefix}.key.weight",) + k_w,
                        (f"{prefix}.value.weight",) + v_w, (f"{prefix}.value.bias",) + v_b]
        else:
            k_w, v_w = split(f"{src}/linear_1/weight", 2)
            _, v_b = split(f"{src}/linear_1/bias", 2)
            out = "linear_2"
            yield (f"{prefix}.query.weight",) + v[f"{src}/linear_0/weight"]
            yield (f"{prefix}.query.bias",) + v[f"{src}/linear_0/bias"]
            yield (f"{prefix}.key.weight",) + k_w
            yield (f"{prefix}.value.weight",) + v_w
            yield (f"{prefix}.value.bias",) + v_b
        yield (f"{prefix}.out.weight",) + v[f"{src}/{out}/weight"]
        yield (f"{prefix}.out.bias",) + v[f"{src}/{out}/bias"]

    def ln(prefix, src):
        yield (f"{prefix}.weight",) + v[f"{src}/gamma"]
        yield (f"{prefix}.bias",) + v[f"{src}/beta"]

    def block(prefix, src, cross):
        yield from attn(f"{prefix}.attn", f"{src}/self_attention", True)
        yield from ln(f"{prefix}.attn_ln", f"{src}/self_attention/layer_norm")
        if cross:
            yield from attn(f"{prefix}.cross_attn", f"{src}/attention", False)
            yield from ln(f"{prefix}.cross_attn_ln", f"{src}/attention/layer_norm")
        for i, lin in ((0, "linear_0"), (2, "linear_1")):
            yield (f"{prefix}.mlp.{i}.weight",) + v[f"{src}/ffn/{lin}/weight"]
            yield (f"{prefix}.mlp.{i}.bias",) + v[f"{src}/ffn/{lin}/bias"]
        yield from ln(f"{prefix}.mlp_ln", f"{src}/ffn/layer_norm")

    yield ("encoder.positional_embedding",) + v["encoder/position_encodings/encodings"]
    for c in ("conv1", "conv2"):
        yield (f"encoder.{c}.weight",) + v[f"encoder/{c}/weight"]
        yield (f"encoder.{c}.bias",) + v[f"encoder/{c}/bias"]
    for i in range(n_enc):
        yield from block(f"encoder.blocks.{i}", f"encoder/layer_{i}", False)
    yield from ln("encoder.ln_post", "encoder/layer_norm")
    yield ("decoder.positional_embedding",) + v["decoder/position_encodings/encodings"]
    yield ("decoder.token_embedding.weight",) + v["decoder/embeddings/weight"]
    for i in range(n_dec):
        yield from block(f"decoder.blocks.{i}", f"decoder/layer_{i}", True)
    yield from ln("decoder.ln", "decoder/layer_norm")


def q8_0(raw):
    """f16 little-endian weights (a multiple of 32 of them) as Q8_0 blocks."""
    out = bytearray()
    for off in range(0, len(raw), 64):
        block = struct.unpack("<32e", raw[off:off + 64])
        amax = max(max(block), -min(block))
        d = amax / 127
        inv = 1 / d if d else 0.0
        # roundf: halves away from zero.
        q = [int(math.copysign(math.floor(abs(x * inv) + 0.5), x)) for x in block]
        out += struct.pack("<e32b", d, *q)
    return bytes(out)


def main():
    args = sys.argv[1:]
    quantize = "--q8_0" in args
    args = [a for a in args if a != "--q8_0"]
    if len(args) != 3:
        sys.exit(__doc__)
    model_bin, vocab_txt, out_path = args
    v = read_ct2(model_bin)
    n_enc = sum(1 for k in v if k.startswith("encoder/layer_") and k.endswith("ffn/layer_norm/gamma"))
    n_dec = sum(1 for k in v if k.startswith("decoder/layer_") and k.endswith("ffn/layer_norm/gamma"))
    n_vocab, n_state = v["decoder/embeddings/weight"][0]
    n_mels = v["encoder/conv1/weight"][0][1]
    hparams = [n_vocab, v["encoder/position_encodings/encodings"][0][0], n_state,
               scalar(v, "encoder/num_heads"), n_enc, v["decoder/position_encodings/encodings"][0][0],
               n_state, scalar(v, "decoder/num_heads"), n_dec, n_mels, 2007 if quantize else 1]
    dec = byte_decoder()
    tokens = []
    for line in open(vocab_txt, encoding="utf-8").read().split("\n"):
        if line.startswith("<|") and line.endswith("|>"):
            break
        tokens.append(bytes(dec[ch] for ch in line))
    with open(out_path, "wb") as out:
        out.write(struct.pack("<i", 0x67676D6C))
        out.write(struct.pack("<11i", *hparams))
        mel = slaney_mel_filterbank(n_mels=n_mels)
        out.write(struct.pack("<ii", len(mel), len(mel[0])))
        for row in mel:
            out.write(struct.pack(f"<{len(row)}f", *row))
        out.write(struct.pack("<i", len(tokens)))
        for t in tokens:
            out.write(struct.pack("<i", len(t)) + t)
        for name, dims, dtype, raw in openai_tensors(v, n_enc, n_dec):
            if dtype != 4:
                sys.exit(f"{name}: expected float16 storage, found dtype {dtype}")
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                dims = (dims[0], 1)
            as_f32 = len(dims) < 2 or name.endswith("positional_embedding") or name.endswith("conv1.bias") or name.endswith("conv2.bias")
            as_q8 = quantize and not as_f32 and len(dims) == 2
            payload = f16_to_f32(raw) if as_f32 else q8_0(raw) if as_q8 else raw
            encoded = name.encode()
            out.write(struct.pack("<iii", len(dims), len(encoded), 0 if as_f32 else 8 if as_q8 else 1))
            out.write(struct.pack(f"<{len(dims)}i", *reversed(dims)))
            out.write(encoded)
            out.write(payload)
    print(f"wrote {out_path}: {len(tokens)} tokens, hparams {hparams}")


if __name__ == "__main__":
    main()
