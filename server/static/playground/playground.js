// The playground page: sliders for the blend, a chat whose replies stream in coloured by
// the member that favoured each token, a side-by-side view, and profiles (save, history,
// rollback). It talks to this server's public API only (api.js); the API key and admin
// token live in the two password fields, i.e. in this page's memory, and nowhere else.
import { describeError, request, streamChat } from "./api.js";
import { Reply } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const PALETTE = 8; // colours m0..m7 in playground.css

const state = {
  served: null, // the family's served name
  policies: [], // the mixed members, in the server's order
  reference: null, // the reference model (strength != 1 needs it), or null
  profiles: new Map(), // name -> {weights, strength} when the admin token could read it, else null
  messages: [], // the conversation so far, as OpenAI messages
  running: new Set(), // AbortControllers of the streams in flight
};

const apiKey = () => $("api-key").value.trim();
const adminToken = () => $("admin-token").value.trim();

function colourOf(name) {
  const at = state.policies.indexOf(name);
  return at < 0 ? "m-none" : `m${at % PALETTE}`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ``err``: an error from api.js, or a sentence of the page's own.
function showError(err) {
  const box = $("error");
  box.textContent = typeof err === "string" ? err : describeError(err);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- connection ---------------------------------------------------------------------

async function connect() {
  clearError();
  const status = $("conn-status");
  status.textContent = "Connecting…";
  try {
    const info = await request("GET", "/info", { token: apiKey() });
    const models = await request("GET", "/v1/models", { token: apiKey() });
    state.served = info.served_name;
    state.policies = info.policies;
    state.reference = info.reference;
    buildSliders();
    buildLegend();
    const prefix = `${state.served}:`;
    const names = models.data.map((m) => m.id).filter((id) => id.startsWith(prefix));
    state.profiles = new Map(names.map((id) => [id.slice(prefix.length), null]));
    const reference = state.reference ? `, reference ${state.reference}` : ", no reference";
    status.textContent = `Connected to ${state.served}: policies `
      + `${state.policies.join(", ")}${reference}.`;
  } catch (err) {
    status.textContent = "Not connected.";
    showError(err);
    return;
  }
  try {
    if (adminToken()) await loadProfiles(); // a wrong admin token still leaves the chat usable
  } catch (err) {
    showError(err);
  }
  fillProfilePicker();
}

async function loadProfiles() {
  const listing = await request("GET", "/admin/profiles", { token: adminToken() });
  state.profiles = new Map(listing.profiles.map((p) => [p.name, p]));
}

function fillProfilePicker(selected = $("profile").value) {
  const picker = $("profile");
  picker.replaceChildren(new Option("Custom: the sliders below", ""));
  for (const name of [...state.profiles.keys()].sort()) picker.append(new Option(name, name));
  picker.value = state.profiles.has(selected) ? selected : "";
}

// ---- sliders and legend -------------------------------------------------------------

function buildSliders() {
  const box = $("weights");
  box.querySelectorAll(".slider-row, #weights-empty").forEach((n) => n.remove());
  for (const name of state.policies) {
    const row = element("div", "slider-row");
    const id = `w-${name}`;
    const label = element("label");
    label.htmlFor = id;
    label.append(element("span", `swatch ${colourOf(name)}`), name);
    const input = element("input");
    // Signed: a negative weight pushes away from that member (guidance; docs/server.md).
    Object.assign(input, { type: "range", id, min: "-2", max: "5", step: "0.1", value: "1" });
    input.dataset.policy = name;
    const out = element("output", "share");
    out.htmlFor = id;
    input.addEventListener("input", () => {
      $("profile").value = ""; // moving a slider leaves the profile: the sliders are sent
      updateShares();
    });
    row.append(label, input, out);
    box.append(row);
  }
  const strength = $("strength");
  strength.disabled = !state.reference; // without a reference only strength 1 is served
  if (!state.reference) strength.value = "1";
  updateShares();
}

function sliders() {
  return [...$("weights").querySelectorAll("input[type=range]")];
}

function updateShares() {
  const inputs = sliders();
  const total = inputs.reduce((sum, i) => sum + Number(i.value), 0);
  for (const input of inputs) {
    const share = total > 0 ? `${Math.round((100 * Number(input.value)) / total)}%` : "0%";
    input.nextElementSibling.textContent = share;
    input.setAttribute("aria-valuetext", `${input.value} (${share} of the blend)`);
  }
  $("strength-out").textContent = Number($("strength").value).toFixed(2);
}

function setSliders(weights, strength) {
  for (const input of sliders()) input.value = String(weights[input.dataset.policy] ?? 0);
  if (strength !== undefined && strength !== null) $("strength").value = String(strength);
  updateShares();
}

function buildLegend() {
  const legend = $("legend");
  legend.replaceChildren(element("span", "legend-title", "Colour = the model that favoured the token most:"));
  for (const name of state.policies) {
    const item = element("span", "legend-item");
    item.append(element("span", `swatch ${colourOf(name)}`), name);
    legend.append(item);
  }
}

// What the request blends: the chosen profile, else the sliders' weights and strength.
function mixing() {
  const profile = $("profile").value;
  if (profile) return { profile };
  const weights = Object.fromEntries(sliders().map((i) => [i.dataset.policy, Number(i.value)]));
  return { weights, strength: Number($("strength").value) };
}

function sampling() {
  const out = {};
  for (const [field, id] of [["max_tokens", "max-tokens"], ["temperature", "temperature"],
    ["seed", "seed"]]) {
    const raw = $(id).value.trim();
    if (raw !== "") out[field] = Number(raw);
  }
  return out;
}

// ---- chat ---------------------------------------------------------------------------

function describeMixing(info) {
  if (!info) return "done";
  const shares = Object.entries(info.weights)
    .map(([name, w]) => `${name} ${Math.round(w * 100)}%`).join(", ");
  const profile = info.profile ? `profile ${info.profile}: ` : "";
  return `done · ${profile}${shares} · strength ${info.strength}`;
}

// Stream one reply into ``reply``; resolves with its text, or throws (error or stop).
async function runReply(reply, body, controller) {
  let info = null;
  let finish = null;
  await streamChat(body, {
    token: apiKey(),
    signal: controller.signal,
    onChunk: (chunk) => {
      if (chunk.mixing) info = chunk.mixing;
      for (const choice of chunk.choices || []) {
        reply.add(choice.delta?.content || "", choice.logprobs?.content || []);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    },
  });
  const cut = finish === "length" ? " · cut at max tokens" : "";
  reply.finish(describeMixing(info) + cut);
  return info;
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt || state.running.size > 0) return;
  if (!state.served) {
    showError("Not connected yet: type the API key if the server has one, and press Connect.");
    return;
  }
  clearError();
  const history = $("history");
  const turn = element("div", "turn");
  turn.append(element("div", "user", prompt));
  history.append(turn);
  const messages = [...state.messages, { role: "user", content: prompt }];
  const common = { messages, logprobs: true, ...sampling() };
  const members = [{ label: $("compare").checked ? "blend" : null,
    body: { model: state.served, ...mixing(), ...common } }];
  if ($("compare").checked) {
    for (const name of state.policies) {
      members.push({ label: `${name} alone`, body: { model: `${state.served}/${name}`, ...common } });
    }
  }
  const row = element("div", members.length > 1 ? "side-by-side" : "single");
  turn.append(row);
  $("prompt").value = "";
  setRunning(true);
  const runs = members.map((member) => {
    const reply = new Reply(row, { colourOf, inspector: $("inspector"), label: member.label });
    const controller = new AbortController();
    state.running.add(controller);
    return runReply(reply, member.body, controller)
      .then((info) => ({ reply, info }))
      .catch((err) => {
        const stopped = err.name === "AbortError";
        reply.finish(stopped ? "stopped" : describeError(err), !stopped);
        if (!stopped) throw err;
        return { reply, info: null };
      })
      .finally(() => state.running.delete(controller));
  });
  const results = await Promise.allSettled(runs);
  setRunning(false);
  const failure = results.find((r) => r.status === "rejected");
  if (failure) showError(failure.reason);
  const blend = results[0];
  if (blend.status === "fulfilled") {
    state.messages = [...messages, { role: "assistant", content: blend.value.reply.text }];
    const info = blend.value.info;
    if (info && info.profile) setSliders(info.weights, info.strength); // show what it blended
  }
  history.scrollTop = history.scrollHeight;
}

function setRunning(running) {
  $("send").disabled = running;
  $("stop").disabled = !running;
}

function stop() {
  // Aborting the fetch closes the connection; the server cancels the sequences and frees
  // their slots when it sees the disconnect.
  for (const controller of state.running) controller.abort();
}

// ---- profiles -------------------------------------------------------------------------

async function chooseProfile() {
  const name = $("profile").value;
  if (!name) return;
  $("profile-name").value = name;
  const known = state.profiles.get(name);
  if (known) setSliders(known.weights, known.strength);
  if (adminToken()) await showVersions(name);
}

async function saveProfile() {
  clearError();
  const name = $("profile-name").value.trim();
  if (!name) {
    showError("Type a name for the profile first.");
    return;
  }
  const { weights, strength } = mixingFromSliders();
  const body = { weights, strength, meta: { source: "playground" } };
  if ($("make-default").checked) body.default = true;
  try {
    const path = `/admin/profiles/${encodeURIComponent(name)}`;
    const saved = await request("PUT", path, { token: adminToken(), body });
    await loadProfiles();
    fillProfilePicker(saved.name);
    await showVersions(saved.name);
  } catch (err) {
    showError(err);
  }
}

function mixingFromSliders() {
  const weights = Object.fromEntries(sliders().map((i) => [i.dataset.policy, Number(i.value)]));
  return { weights, strength: Number($("strength").value) };
}

async function showVersions(name) {
  const box = $("versions");
  try {
    const versions = [];
    let after = 0;
    for (;;) {
      const path = `/admin/profiles/${encodeURIComponent(name)}/versions?limit=100&after=${after}`;
      const page = await request("GET", path, { token: adminToken() });
      versions.push(...page.versions);
      if (page.next === null || page.next === undefined) break;
      after = page.next;
    }
    box.replaceChildren(element("h3", null, `Versions of ${name}`));
    const list = element("ol", "versions");
    const newest = versions.length ? versions[versions.length - 1].version : null;
    for (const v of versions) {
      const item = element("li");
      item.dataset.version = String(v.version);
      const shares = Object.entries(v.weights)
        .map(([policy, w]) => `${policy} ${Math.round(w * 100)}%`).join(", ");
      const when = new Date(v.created_at * 1000).toLocaleString();
      const from = v.meta && v.meta.rollback_of ? ` (rollback to v${v.meta.rollback_of})` : "";
      item.append(element("span", "version-text",
        `v${v.version}${from}: ${shares}, strength ${v.strength} · ${when}`));
      if (v.version === newest) {
        item.append(element("span", "hint", " current"));
      } else {
        const button = element("button", "rollback", `Roll back to v${v.version}`);
        button.type = "button";
        button.addEventListener("click", () => rollback(name, v.version));
        item.append(button);
      }
      list.append(item);
    }
    box.append(list);
  } catch (err) {
    showError(err);
  }
}

async function rollback(name, version) {
  clearError();
  try {
    const path = `/admin/profiles/${encodeURIComponent(name)}`;
    const restored = await request("PUT", path, { token: adminToken(), body: { version } });
    await loadProfiles();
    fillProfilePicker(name);
    setSliders(restored.weights, restored.strength);
    await showVersions(name);
  } catch (err) {
    showError(err);
  }
}

// ---- wiring ---------------------------------------------------------------------------

function wire() {
  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  $("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => {
    state.messages = [];
    $("history").replaceChildren();
  });
  $("strength").addEventListener("input", () => {
    $("profile").value = "";
    updateShares();
  });
  $("profile").addEventListener("change", chooseProfile);
  $("save-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveProfile();
  });
  updateShares();
  if (document.body.dataset.apiKeyRequired === "true") {
    $("conn-status").textContent = "This server needs an API key: type it and press Connect.";
    $("api-key").focus();
  } else {
    connect();
  }
}

wire();
