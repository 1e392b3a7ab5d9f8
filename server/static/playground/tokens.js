// A reply shown token by token, each token coloured by the member that favoured it most.
// Model text only ever reaches the page through textContent: a reply that contains
// "<script>" is shown as those characters, never parsed as markup.

// The member that favoured a token most: the largest policy_logprob - logprob, i.e. the
// member whose own log-prob of the token is highest relative to the mixture's. Members
// that did not run for the request (weight 0: null) are skipped. ``tokens`` are OpenAI
// logprob entries; a span can hold several (a character split over tokens), whose margins
// add up. Returns null when no member reported a log-prob.
export function favoured(tokens) {
  const margins = new Map();
  for (const token of tokens) {
    for (const [name, lp] of Object.entries(token.policy_logprobs || {})) {
      if (lp === null || lp === undefined) continue;
      margins.set(name, (margins.get(name) ?? 0) + (lp - token.logprob));
    }
  }
  let best = null;
  for (const [name, margin] of margins) {
    if (best === null || margin > margins.get(best)) best = name;
  }
  return best;
}

function formatLogprob(lp) {
  return lp === null || lp === undefined ? "not run (weight 0)" : lp.toFixed(3);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Fill the inspector with one span's tokens: the mixture's log-prob and every member's.
export function inspect(inspector, span, colourOf) {
  inspector.replaceChildren();
  const title = element("p", "inspect-title");
  title.append("Token ", element("code", null, JSON.stringify(span.dataset.text)));
  inspector.append(title);
  for (const token of span.tokens) {
    const best = favoured([token]);
    const table = element("table", "inspect-table");
    const head = table.createTHead().insertRow();
    for (const label of ["model", "log-prob", "vs blend"]) head.append(element("th", null, label));
    const body = table.createTBody();
    const mix = body.insertRow();
    mix.className = "mixture";
    mix.append(element("td", null, "blend"), element("td", null, token.logprob.toFixed(3)),
      element("td", null, ""));
    for (const [name, lp] of Object.entries(token.policy_logprobs || {})) {
      const row = body.insertRow();
      row.dataset.member = name;
      if (name === best) row.classList.add("favoured");
      const swatch = element("span", `swatch ${colourOf(name)}`);
      const nameCell = element("td");
      nameCell.append(swatch, name);
      const margin = lp === null || lp === undefined ? "" : (lp - token.logprob).toFixed(3);
      row.append(nameCell, element("td", "logprob", formatLogprob(lp)),
        element("td", null, margin.startsWith("-") || margin === "" ? margin : `+${margin}`));
    }
    if (span.tokens.length > 1) {
      inspector.append(element("p", "hint", `piece ${JSON.stringify(token.token)}`));
    }
    inspector.append(table);
  }
}

// One reply (a message bubble): add() each streamed chunk, then finish().
export class Reply {
  constructor(container, { colourOf, inspector, label }) {
    this.colourOf = colourOf;
    this.inspector = inspector;
    this.text = "";
    this.pending = []; // tokens whose bytes have not completed a character yet
    this.node = element("div", "reply");
    if (label) this.node.append(element("div", "reply-label", label));
    this.body = element("div", "reply-body");
    this.status = element("div", "reply-status", "streaming…");
    this.status.setAttribute("role", "status"); // read out when the reply ends, not per token
    this.node.append(this.body, this.status);
    container.append(this.node);
    this.body.addEventListener("keydown", (event) => this.onKey(event));
  }

  // One chunk's text and its OpenAI logprob entries (one per token).
  add(text, tokens) {
    this.pending.push(...(tokens || []));
    if (!text) return;
    this.text += text;
    if (this.pending.length === 0) {
      this.body.append(document.createTextNode(text));
      return;
    }
    const span = element("span", "tok", text);
    span.tokens = this.pending;
    span.dataset.text = text;
    this.pending = [];
    const best = favoured(span.tokens);
    if (best !== null) {
      span.classList.add(this.colourOf(best));
      span.dataset.member = best;
    }
    span.tabIndex = this.body.querySelector(".tok") ? -1 : 0; // one tab stop a reply
    const show = () => inspect(this.inspector, span, this.colourOf);
    span.addEventListener("mouseenter", show);
    span.addEventListener("focus", show);
    span.addEventListener("click", () => span.focus());
    this.body.append(span);
  }

  finish(message, isError = false) {
    this.status.textContent = message;
    this.node.classList.toggle("failed", isError);
    this.node.classList.add("done");
  }

  onKey(event) {
    const spans = [...this.body.querySelectorAll(".tok")];
    const at = spans.indexOf(document.activeElement);
    if (at < 0) return;
    const moves = { ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1,
      Home: 0, End: spans.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const next = spans[Math.max(0, Math.min(spans.length - 1, moves[event.key]))];
    spans[at].tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  }
}
