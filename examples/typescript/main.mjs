// mistguard around Mistral chat completions, in JavaScript (Node.js ESM, no build step).
//
// 1. Classify the prompt (DIRECTION_INPUT) before it goes to Mistral; refuse to send it when the
//    action is RESTRICT or worse (RESTRICT, RATE_LIMIT, BLOCK, HARD_BLOCK); send the sanitized
//    text on SANITIZE.
// 2. Stream the chat completion (mistral.chat.stream) through ClassifyStream (DIRECTION_OUTPUT),
//    printing only `released_text`, and stop on a block.
// 3. Ask for tool calls (mistral.chat.complete with tools) and guard each with AuthorizeToolCall
//    before running it: run it only when the decision is ALLOW.
//
// Configuration (environment):
//   MISTGUARD_ADDR      the daemon, host:port (default 127.0.0.1:50051)
//   MISTGUARD_TOKEN     sent as `authorization: Bearer <token>` when set
//   MISTRAL_API_KEY     Mistral's API key
//   MISTRAL_SERVER_URL  Mistral's base URL (default https://api.mistral.ai)
//   MISTRAL_MODEL       the model (default mistral-small-latest)
//
// Usage: node main.mjs ["the prompt"]
//
// The service definition is loaded from the repository's proto/ at run time
// (@grpc/proto-loader): nothing is generated or committed.

import path from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { Mistral } from "@mistralai/mistralai";

const here = path.dirname(fileURLToPath(import.meta.url));
const protoDir = process.env.MISTGUARD_PROTO_DIR ?? path.join(here, "..", "..", "proto");

// keepCase: the proto's field names (released_text); enums as their names; uint64 as numbers.
const definition = protoLoader.loadSync("mistguard/v1/guard.proto", {
  includeDirs: [protoDir],
  keepCase: true,
  enums: String,
  longs: Number,
  defaults: true,
  oneofs: true,
});
const pb = grpc.loadPackageDefinition(definition).mistguard.v1;

// Action names, least to most severe (their enum numbers).
const ACTIONS = [
  "ACTION_UNSPECIFIED",
  "ACTION_ALLOW",
  "ACTION_FLAG",
  "ACTION_WARN",
  "ACTION_SANITIZE",
  "ACTION_RESTRICT",
  "ACTION_RATE_LIMIT",
  "ACTION_BLOCK",
  "ACTION_HARD_BLOCK",
];
const severity = (a) => ACTIONS.indexOf(a);
const actionName = (a) => String(a).replace(/^ACTION_/, "");
const blocks = (a) => severity(a) >= severity("ACTION_BLOCK");
const rulesOf = (hits) => [...new Set((hits ?? []).map((h) => h.rule_id))].sort().join(",") || "-";

const SUBJECT = "example-typescript";
const DEFAULT_PROMPT = "What is the weather in Paris? And clean up the old staging database.";
// The caller's context for AuthorizeToolCall (what the policies' `context` sees).
const TOOL_CONTEXT = { environment: "production", user_role: "developer" };

// The tools offered to the model, in Mistral's function-calling format.
const TOOLS = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "The current weather in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string" } },
        required: ["city"],
      },
    },
  },
  {
    type: "function",
    function: {
      name: "delete_database",
      description: "Deletes a database",
      parameters: {
        type: "object",
        properties: { name: { type: "string" } },
        required: ["name"],
      },
    },
  },
];

const RUNNABLE = {
  get_weather: ({ city }) => `sunny, 21 C in ${city}`,
  delete_database: ({ name }) => `database ${name} deleted`,
};

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.MISTGUARD_TOKEN) {
    md.set("authorization", `Bearer ${process.env.MISTGUARD_TOKEN}`);
  }
  return md;
}

// A unary call as a promise.
function unary(guard, method, request) {
  return new Promise((resolve, reject) => {
    guard[method](request, metadata(), (err, res) => (err ? reject(err) : resolve(res)));
  });
}

// Step 1: the text to send to Mistral (the prompt, or its sanitized text), or null.
async function classifyPrompt(guard, prompt) {
  const r = await unary(guard, "Classify", {
    text: prompt,
    direction: "DIRECTION_INPUT",
    subject: SUBJECT,
  });
  console.log(
    `prompt verdict: ${actionName(r.action)} (rules ${rulesOf(r.hits)}, decision ${r.decision_id})`,
  );
  if (r.message) console.log(`prompt message: ${r.message}`);
  if (severity(r.action) >= severity("ACTION_RESTRICT")) {
    console.log("refused: the prompt was not sent to Mistral");
    return null;
  }
  if (r.action === "ACTION_SANITIZE" && r.sanitized_text != null) return r.sanitized_text;
  return prompt;
}

// A delta's content: a string, or a list of chunks (their text parts).
function textOf(content) {
  if (content == null) return "";
  if (typeof content === "string") return content;
  return content.map((c) => c.text ?? "").join("");
}

// Step 2: the streamed completion, through ClassifyStream; prints only released_text.
async function streamCompletion(guard, mistral, model, prompt) {
  const events = await mistral.chat.stream({
    model,
    messages: [{ role: "user", content: prompt }],
  });
  const call = guard.ClassifyStream(metadata());
  let end = null;
  const done = new Promise((resolve, reject) => {
    call.on("data", (r) => {
      if (end) return;
      if (r.released_text) process.stdout.write(r.released_text);
      if (blocks(r.action) || r.final) {
        end = r;
        // Stop here: nothing past the block is shown, and the daemon ends the stream.
        call.cancel();
      }
    });
    call.on("end", resolve);
    call.on("error", (e) => (e.code === grpc.status.CANCELLED && end ? resolve() : reject(e)));
  });
  console.log("completion:");
  let first = true;
  for await (const event of events) {
    if (end) break; // stops reading from Mistral (cancels the HTTP stream)
    for (const choice of event.data.choices) {
      const text = textOf(choice.delta.content);
      if (!text) continue;
      call.write(
        first ? { text, direction: "DIRECTION_OUTPUT", subject: SUBJECT } : { text },
      );
      first = false;
    }
  }
  if (!end) call.end();
  await done;
  process.stdout.write("\n");
  if (end && blocks(end.action)) {
    console.log(
      `stream blocked: ${actionName(end.action)} (rules ${rulesOf(end.hits)}, reason ${end.reason})`,
    );
    if (end.message) console.log(`stream message: ${end.message}`);
  } else if (end) {
    console.log(`stream end: ${actionName(end.action)} (reason ${end.reason})`);
  }
}

// Step 3: the completion's tool_calls, each authorized before it runs.
async function guardToolCalls(guard, mistral, model, prompt) {
  const res = await mistral.chat.complete({
    model,
    messages: [{ role: "user", content: prompt }],
    tools: TOOLS,
    toolChoice: "auto",
  });
  const calls = res.choices[0].message?.toolCalls ?? [];
  console.log(`tool calls: ${calls.length}`);
  for (const c of calls) {
    const name = c.function.name;
    const args = c.function.arguments;
    const argsJson = typeof args === "string" ? args : JSON.stringify(args);
    const d = await unary(guard, "AuthorizeToolCall", {
      tool: name,
      arguments_json: argsJson,
      context_json: JSON.stringify(TOOL_CONTEXT),
      subject: SUBJECT,
      request_id: c.id && c.id !== "null" ? c.id : "",
    });
    const decision = String(d.decision).replace(/^TOOL_DECISION_/, "");
    console.log(`tool ${name}: ${decision} (policy ${d.policy || "-"}: ${d.reason})`);
    if (d.decision === "TOOL_DECISION_ALLOW" && RUNNABLE[name]) {
      console.log(`ran ${name}: ${RUNNABLE[name](JSON.parse(argsJson || "{}"))}`);
    } else if (d.decision === "TOOL_DECISION_REQUIRE_APPROVAL") {
      console.log(`not run: ${name} (approval ${d.approval_id} by ${d.approvers.join(", ")})`);
    } else {
      console.log(`not run: ${name}`);
    }
  }
}

async function main() {
  let prompt = process.argv[2] ?? DEFAULT_PROMPT;
  const addr = (process.env.MISTGUARD_ADDR ?? "127.0.0.1:50051").replace(/^(http|grpc):\/\//, "");
  const model = process.env.MISTRAL_MODEL ?? "mistral-small-latest";
  const mistral = new Mistral({
    apiKey: process.env.MISTRAL_API_KEY ?? "",
    serverURL: process.env.MISTRAL_SERVER_URL ?? "https://api.mistral.ai",
  });
  const guard = new pb.Guard(addr, grpc.credentials.createInsecure());
  try {
    prompt = await classifyPrompt(guard, prompt);
    if (prompt === null) return;
    await streamCompletion(guard, mistral, model, prompt);
    await guardToolCalls(guard, mistral, model, prompt);
  } finally {
    guard.close();
  }
}

main().catch((e) => {
  console.error(`example: ${e.stack ?? e}`);
  process.exit(1);
});
