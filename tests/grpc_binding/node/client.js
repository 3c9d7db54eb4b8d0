// A client in another language, built only from the .proto that `wirework proto` emits.
// Usage: node client.js <port> <proto root> <proto file relative to the root>
// Prints one JSON document with what each call returned; tests/grpc_binding/test_node.py checks it.
"use strict";

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [port, root, file] = process.argv.slice(2);
const definition = protoLoader.loadSync(file, {
  includeDirs: [root],
  keepCase: true, // field names as in the models (order_id, not orderId)
  longs: String, // int64 without losing precision
  enums: String, // STATUS_OPEN, not 1
  defaults: false,
  oneofs: true,
});
const pkg = grpc.loadPackageDefinition(definition).wirework.grpc_shop;
const client = new pkg.GrpcShop(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 10000);

function unary(method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: deadline() }, (error, response) => {
      if (error) {
        resolve({
          error: {
            code: error.code,
            details: error.details,
            type: error.metadata.get("wirework-error-type")[0] || null,
          },
        });
      } else {
        resolve({ response });
      }
    });
  });
}

function serverStream(method, request) {
  return new Promise((resolve) => {
    const items = [];
    const call = client[method](request, { deadline: deadline() });
    call.on("data", (item) => items.push(item));
    call.on("error", (error) => resolve({ items, error: { code: error.code, details: error.details } }));
    call.on("end", () => resolve({ items }));
  });
}

async function main() {
  const result = {
    get_order: await unary("GetOrder", { order_id: "00000000-0000-0000-0000-000000000007" }),
    place_order: await unary("PlaceOrder", {
      lines: [{ sku: "pear", qty: 3 }],
      ship_to: { street: "1 Main St", city: "Lyon" },
      priority: "PRIORITY_HIGH",
      tags: { gift: "yes" },
    }),
    invalid: await unary("PlaceOrder", { lines: [{ sku: "pear", qty: 0 }] }),
    missing: await unary("GetOrder", { order_id: "00000000-0000-0000-0000-000000000194" }),
    watch: await serverStream("Watch", { order_id: "o-9", count: 3 }),
  };
  process.stdout.write(JSON.stringify(result) + "\n");
  client.close();
}

main().catch((error) => {
  process.stderr.write(`${error.stack}\n`);
  process.exit(1);
});
