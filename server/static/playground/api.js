// The server's public API, as the playground calls it: JSON requests, the OpenAI chat
// stream (server-sent events over fetch, so a stop aborts it), and errors in words.
// Every path is on this page's own origin: keys typed into the page go nowhere else.

const STREAM_CUT = -1; // the status of an error event inside a stream

export class ApiError extends Error {
  constructor(status, message, { param = null, code = null, retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function ownOrigin(path) {
  // A relative path only ("/v1/..."): never a URL, never "//host/...".
  if (typeof path !== "string" || !path.startsWith("/") || path.startsWith("//")) {
    throw new Error(`refusing to send a request outside this server: ${path}`);
  }
  return path;
}

function headers(token, json) {
  const out = {};
  if (json) out["Content-Type"] = "application/json";
  if (token) out.Authorization = `Bearer ${token}`;
  return out;
}

// The server's error body is {"error": {"message", "type", "param", "code"}}.
async function errorFrom(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    error = { message: response.statusText };
  }
  const retry = response.headers.get("Retry-After");
  return new ApiError(response.status, error.message || `HTTP ${response.status}`, {
    param: error.param ?? null,
    code: error.code ?? null,
    retryAfter: retry === null ? null : Number(retry),
  });
}

export async function request(method, path, { token = "", body, signal } = {}) {
  let response;
  try {
    response = await fetch(ownOrigin(path), {
      method,
      headers: headers(token, body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      credentials: "same-origin",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `the server could not be reached (${err.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// POST a chat request with stream: true; onChunk gets each parsed chunk. Resolves when the
// stream ends ([DONE]); rejects with an ApiError (an error status, or an error event the
// server sends after the 200) or an AbortError (the stop button).
export async function streamChat(body, { token = "", signal, onChunk }) {
  let response;
  try {
    response = await fetch(ownOrigin("/v1/chat/completions"), {
      method: "POST",
      headers: headers(token, true),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
      credentials: "same-origin",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `the server could not be reached (${err.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue; // ": keep-alive" comments and the like
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) { // a failure after the 200: the reply is cut
          throw new ApiError(STREAM_CUT, chunk.error.message, { code: chunk.error.code ?? null });
        }
        onChunk(chunk);
      }
    }
  }
  throw new ApiError(0, "the stream ended before the reply was complete");
}

// One sentence a person can act on, for each status the server answers with.
export function describeError(err) {
  if (!(err instanceof ApiError)) return `Something went wrong in the page: ${err.message}`;
  const retry = err.retryAfter !== null && Number.isFinite(err.retryAfter)
    ? ` Try again in ${err.retryAfter} s.` : "";
  switch (err.status) {
    case STREAM_CUT:
      return `The server cut the reply: ${err.message}.`;
    case 0:
      return `No answer: ${err.message}.`;
    case 400:
      return err.param
        ? `The server refused the parameter "${err.param}": ${err.message}`
        : `The server refused the request: ${err.message}`;
    case 401:
      return "Not authorised (401): the API key, or the admin token for profiles, is missing "
        + `or wrong. Type it under Connection. (${err.message})`;
    case 403:
      return `Forbidden (403): ${err.message}. Profiles need the server started with an admin token.`;
    case 404:
      return `Not found (404): ${err.message}`;
    case 429:
      return `The server is busy (429): all its decoding slots are taken.${retry}`;
    case 503:
      return `The server is unavailable (503): ${err.message}.${retry}`;
    default:
      return `The server answered ${err.status}: ${err.message}${retry}`;
  }
}
