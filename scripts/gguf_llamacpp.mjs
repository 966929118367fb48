// Greedy decoding of a GGUF file in llama.cpp itself (node-llama-cpp's prebuilt build), for scripts/check_gguf.py.
// Run from a directory where `npm i -E node-llama-cpp@3.21.1` was run (it is imported from there, not from here):
//     node scripts/gguf_llamacpp.mjs MODEL.gguf PROMPT.txt N
// prints one JSON line: {"prompt": ids, "generated": ids, "text": ...}; the prompt text is tokenized with its
// special tokens (our turn markers), after llama.cpp's <bos>.
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const [modelPath, promptFile, n] = process.argv.slice(2);
const {getLlama} = await import(pathToFileURL(join(process.cwd(), "node_modules/node-llama-cpp/dist/index.js")).href);
const llama = await getLlama({gpu: false, logLevel: "error"});
const model = await llama.loadModel({modelPath});
const sequence = (await model.createContext({contextSize: 1024})).getSequence();
const prompt = [model.tokens.bos, ...model.tokenize(readFileSync(promptFile, "utf8"), true)];
const generated = [];
for await (const token of sequence.evaluate(prompt, {temperature: 0})) {  // greedy, no repetition penalty
    generated.push(token);
    if (generated.length >= Number(n) || model.isEogToken(token)) break;
}
console.log(JSON.stringify({prompt: prompt.map(Number), generated: generated.map(Number),
                            text: model.detokenize(generated)}));
process.exit(0);
