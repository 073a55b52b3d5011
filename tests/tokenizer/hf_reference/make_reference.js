// Writes what Hugging Face `tokenizers` (the Rust crate 0.22.2, through the Node binding
// @anush008/tokenizers@0.6.0, the binding that made ../shared/fixtures/tokenizers) gives for
// texts.json: encodings without added specials, their decodes, and decodes of random ids with
// and without skip_special_tokens. Regenerate with:
//   npm install @anush008/tokenizers@0.6.0 && python3 gen_texts.py texts.json &&
//   for t in qwen3 deepseek_v3 mistral; do node make_reference.js ../../../../shared/fixtures/tokenizers/$t $t.json; done
const {Tokenizer} = require('@anush008/tokenizers');
const fs = require('fs');
(async () => {
  const [dir, out] = process.argv.slice(2);
  const tok = Tokenizer.fromFile(dir + '/tokenizer.json');
  const texts = JSON.parse(fs.readFileSync(__dirname + '/texts.json', 'utf8'));
  const size = tok.getVocabSize(true);
  let seed = 7;
  const rnd = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
  const res = {meta: {reference: 'tokenizers 0.22.2 via @anush008/tokenizers@0.6.0', tokenizer: dir.split('/').pop()},
               encode: [], decode: []};
  for (const t of texts) {
    const ids = Array.from((await tok.encode(t, null, {addSpecialTokens: false})).getIds());
    const decoded = await tok.decode(ids, false);
    res.encode.push(decoded === t ? {ids} : {ids, decoded});  // decoded left out when it is the text
  }
  for (let i = 0; i < 200; ++i) {
    const ids = [];
    const n = 1 + Math.floor(rnd() * 12);
    for (let k = 0; k < n; ++k) {
      const id = rnd() < 0.5 ? Math.floor(rnd() * 400) : Math.floor(rnd() * size);
      if (tok.idToToken(id) !== null) ids.push(id);
    }
    res.decode.push({ids, text: await tok.decode(ids, false), skipped: await tok.decode(ids, true)});
  }
  fs.writeFileSync(out, JSON.stringify(res) + '\n');
})();
