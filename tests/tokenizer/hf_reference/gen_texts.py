# Random texts for the differential test against HF tokenizers (see make_reference.js).
import json, random, sys
random.seed(12345)
pools = [
  "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
  "    \t\n\r\n\u00a0\u2000\u2003\u200a\u3000\u2028\u0085\u000b\u000c", "éèêëàâäôöûüçñÅøßÆœ", "\u0301\u0300\u0308\u0323\u0327\u20dd",
  "αβγδεζΩπσ", "абвгдЖЯ", "你好世界中文字符龥䶵鿿𠀀", "ぁあいうゟ゠アイウヿー", "가나다\u1100\u1161\u11a8", "🍕👍🏽🇫🇷👨‍👩‍👧❤️\u200d\ufe0f",
  "مرحبا", "नमस्ते", "∑∫≈≠≤∞", "ＡＢＣ１２３！", "\uf900\ufb01\u2126\u212b", "٣٤٥", "Ⅻ½²",
]
words = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "IT'S", "don't", " ", "  ", "\n\n", "1234", "3.14",
         "<|im_end|>", "<|im_start|>", "<think>", "</think>", "<|endoftext|>", "<|IM_END|>", "<|im_end|",
         "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁sep｜>", "<|User|>", "<s>", "</s>", "<unk>", "<s", "▁", "▁▁",
         "[INST]", "[/INST]", "https://example.com/a?b=c", "def f(x):\n    return x", "    ", "\t\t"]
texts = []
for i in range(600):
  n = random.randint(1, 40)
  s = ""
  for _ in range(n):
    if random.random() < 0.25:
      s += random.choice(words)
    else:
      pool = random.choice(pools)
      s += "".join(random.choice(pool) for _ in range(random.randint(1, 6)))
  texts.append(s)
texts += ["", " ", "\n", "a", "\u0301", "\u0301a", "e\u0301\u0301", "x\u00a0\u00a0y", "   \n  \n", "<|im_end|><|im_end|>", "<s><s>", "</s></s>"]
json.dump(texts, open(sys.argv[1] if len(sys.argv) > 1 else "texts.json", "w"), ensure_ascii=False)

