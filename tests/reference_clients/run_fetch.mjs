// Runs fetch.js, the reference description's JavaScript example copied verbatim, in Node 20, and
// prints what it put on the page as one JSON line: {"images": [{"tag", "width", "height", "bytes"}]}.
// Usage: node run_fetch.mjs SERVER_URL. The one change to the snippet: its http://localhost:8000 becomes
// SERVER_URL, so the test server runs on a free port.
//
// Why Node with a stub `document`: the example is browser code (document.createElement), but the
// request, the wait for the heartbeats and `response.json()` are Node's own `fetch` (undici), so this
// runs everywhere the tests run, with no browser. The stub has exactly the two things the snippet
// touches; each appended element is kept, and its data: URL decoded here. tests/test_browser.py runs
// the same file in a real Chromium page as well. The snippet is evaluated as a classic script, as a
// <script> tag would run it, so it sees `fetch` and `document` as globals.
//
// A failure inside the snippet (connection refused, a body without `images`) is an unhandled rejection
// of `generateImage()`: Node prints it and exits 1.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import vm from 'node:vm';

const appended = [];
globalThis.document = {
  createElement: (tag) => ({ tagName: tag.toUpperCase(), src: '' }),
  body: { appendChild: (node) => { appended.push(node); return node; } },
};

/** Width and height from a PNG's IHDR chunk (bytes 16-23, big-endian), or null for non-PNG data. */
function describe(element) {
  const prefix = 'data:image/png;base64,';
  if (!element.src.startsWith(prefix)) return { tag: element.tagName, src: element.src.slice(0, 40) };
  const png = Buffer.from(element.src.slice(prefix.length), 'base64');
  const isPng = png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
  return {
    tag: element.tagName,
    width: isPng ? png.readUInt32BE(16) : null,
    height: isPng ? png.readUInt32BE(20) : null,
    bytes: png.length,
  };
}

let reported = false;
process.on('beforeExit', () => {
  // The snippet does not return its promise; the event loop running dry means it has settled.
  if (reported) return;
  reported = true;
  console.log(JSON.stringify({ images: appended.map(describe) }));
});

const [serverUrl] = process.argv.slice(2);
if (!serverUrl) throw new Error('usage: node run_fetch.mjs SERVER_URL');
const snippet = fileURLToPath(new URL('./fetch.js', import.meta.url));
const source = readFileSync(snippet, 'utf8');
if (!source.includes('http://localhost:8000')) throw new Error('fetch.js no longer calls http://localhost:8000');
vm.runInThisContext(source.replaceAll('http://localhost:8000', serverUrl), { filename: snippet });
