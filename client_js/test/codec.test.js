// The JS codec against the golden vectors shared with the Python tests, byte for byte.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import {
  base64ToBytes, bytesToBase64, encodeBinary, encodeBinaryHeader, encodeText, parseClient, parseServer, toWire,
} from "../src/codec.js";
import { PixelstreamError } from "../src/errors.js";

const vectors = JSON.parse(readFileSync(new URL("../../tests/vectors/codec.json", import.meta.url), "utf8"));

/** A vector's message with Base64 `data` as bytes (the form the encoder takes). */
function withBytes(message) {
  return "data" in message ? { ...message, data: base64ToBytes(message.data) } : { ...message };
}

describe("golden vectors", () => {
  test("there are vectors of every kind", () => {
    assert.ok(vectors.client_text.length >= 6);
    assert.ok(vectors.client_binary.length >= 3);
    assert.ok(vectors.server_text.length >= 12);
  });

  for (const [index, vector] of vectors.client_text.entries()) {
    test(`client text #${index} (${vector.message.type}) encodes to the exact wire text`, () => {
      assert.equal(encodeText(withBytes(vector.message)), vector.wire);
    });
    test(`client text #${index} (${vector.message.type}) parses back to the message`, () => {
      assert.deepEqual(parseClient(vector.wire), withBytes(vector.message));
    });
  }

  for (const [index, vector] of vectors.client_binary.entries()) {
    const wire = base64ToBytes(vector.wire_base64);
    test(`client binary #${index} (${vector.message.type}) encodes to the exact bytes`, () => {
      assert.deepEqual(encodeBinary(withBytes(vector.message)), wire);
    });
    test(`client binary #${index}: header + payload as a Blob is the same frame`, async () => {
      const { data, ...header } = withBytes(vector.message);
      const blob = new Blob([encodeBinaryHeader(header), data]);
      assert.deepEqual(new Uint8Array(await blob.arrayBuffer()), wire);
    });
    test(`client binary #${index} (${vector.message.type}) parses back to the message`, () => {
      assert.deepEqual(parseClient(wire), withBytes(vector.message));
    });
  }

  for (const [index, vector] of vectors.server_text.entries()) {
    test(`server text #${index} (${vector.message.type}) parses to the message`, () => {
      assert.deepEqual(parseServer(vector.wire), vector.message);
      assert.deepEqual(parseServer(new TextEncoder().encode(vector.wire)), vector.message);
    });
  }
});

describe("encoding", () => {
  test("fields go out in wire order whatever the object's order; absent ones are omitted", () => {
    const text = encodeText({ resume: "t", options: { top_k: 3 }, size: 5, id: "a", type: "upload", sha256: undefined });
    assert.equal(text, '{"type":"upload","id":"a","size":5,"options":{"top_k":3},"resume":"t"}');
    assert.deepEqual(toWire({ type: "cancel", id: "x", extra: 1 }), { type: "cancel", id: "x" });
  });

  test("upload and frame always carry options, as the Python codec does", () => {
    assert.equal(encodeText({ type: "upload", id: "a", size: 1 }), '{"type":"upload","id":"a","size":1,"options":{}}');
    assert.equal(encodeText({ type: "frame", stream: "c", seq: 1, data: new Uint8Array([1]) }),
      '{"type":"frame","stream":"c","seq":1,"options":{},"data":"AQ=="}');
  });

  test("only chunk and frame have a binary form", () => {
    assert.throws(() => encodeBinaryHeader({ type: "upload", id: "a", size: 1 }), TypeError);
    assert.throws(() => toWire({ type: "welcome" }), TypeError);
  });

  test("Base64 matches Node's encoder on every length and byte value", () => {
    for (const length of [0, 1, 2, 3, 4, 5, 255, 256, 0x8000 - 1, 0x8000, 0x8000 + 1, 100_003]) {
      const bytes = new Uint8Array(length).map((_, i) => (i * 131 + length) & 0xff);
      const expected = Buffer.from(bytes).toString("base64");
      assert.equal(bytesToBase64(bytes), expected, `length ${length}`);
      assert.deepEqual(base64ToBytes(expected), bytes);
    }
  });

  test("the JS fallback encoder agrees with the native one", () => {
    const bytes = new Uint8Array(70_000).map((_, i) => (i * 7) & 0xff);
    const plain = new Uint8Array(bytes); // the fallback path is taken where toBase64 is missing
    Object.defineProperty(plain, "toBase64", { value: undefined });
    assert.equal(bytesToBase64(plain), Buffer.from(bytes).toString("base64"));
  });
});

describe("parsing", () => {
  const code = (fn) => {
    try {
      fn();
    } catch (error) {
      assert.ok(error instanceof PixelstreamError);
      return error.code;
    }
    return "no error";
  };

  test("server messages that are not objects or lack required fields are bad_message", () => {
    assert.equal(code(() => parseServer("not json")), "bad_message");
    assert.equal(code(() => parseServer("[1]")), "bad_message");
    assert.equal(code(() => parseServer('{"no":"type"}')), "bad_message");
    assert.equal(code(() => parseServer('{"type":"accepted","id":"a","offset":0}')), "bad_message");
    assert.equal(code(() => parseServer('{"type":"progress","stage":"upload"}')), "bad_message");
    assert.equal(code(() => parseServer('{"type":"error","id":"a"}')), "bad_message");
  });

  test("unknown server message types are returned for the caller to ignore", () => {
    assert.deepEqual(parseServer('{"type":"hello","x":1}'), { type: "hello", x: 1 });
  });

  test("binary client frames are checked like the server checks them", () => {
    assert.equal(code(() => parseClient(new Uint8Array([0]))), "bad_message");
    assert.equal(code(() => parseClient(new Uint8Array([0, 0, 1]))), "bad_message");
    assert.equal(code(() => parseClient(new Uint8Array([0, 50, 123]))), "bad_message");
    const cancel = new TextEncoder().encode('{"type":"cancel","id":"a"}');
    assert.equal(code(() => parseClient(new Uint8Array([0, cancel.length, ...cancel]))), "bad_message");
    assert.equal(code(() => parseClient('{"type":"chunk","id":"a","offset":0,"data":"***"}')), "bad_base64");
  });
});
