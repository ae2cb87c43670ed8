// The chat page of gptrl.serve: talk to the served model (streamed replies), and give feedback on its replies:
// a rating (with an optional reason), a comparison after a regenerate, or an edit (what it should have said).
"use strict";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
if (query.get("token")) {  // keep the access token for this tab only, out of the address bar and its history
  sessionStorage.setItem("gptrl-token", query.get("token"));
  history.replaceState(null, "", location.pathname);
}
const token = sessionStorage.getItem("gptrl-token") || "";
let modelId = null;
let history_ = [];  // the conversation: [{role, content}]

function headers() {
  const h = {"Content-Type": "application/json"};
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

function setStatus(text, error = false) {
  const s = $("status");
  s.hidden = !text;
  s.textContent = text;
  s.classList.toggle("error", error);
}

async function errorText(response) {
  try { return (await response.json()).error.message; }
  catch (e) { return response.status + " " + response.statusText; }
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function settings(messages) {
  const body = {model: modelId, messages, stream: true, temperature: parseFloat($("temperature").value || "0.8")};
  const maxTokens = parseInt($("max_tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  if ($("user").value.trim()) body.user = $("user").value.trim();
  return body;
}

// The conversation as sent: the system message, then the turns (an empty reply is left out: a turn needs text).
function promptMessages(before) {
  const system = $("system").value.trim();
  return (system ? [{role: "system", content: system}] : []).concat(before.filter((m) => m.content.trim()));
}

// Streams one reply to `messages` into `target` (its text grows as tokens come); returns {text, id}.
async function streamReply(messages, target) {
  const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                        body: JSON.stringify(settings(messages))});
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", id = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return {text, id};
      const chunk = JSON.parse(data);
      id = chunk.id;
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          target.textContent = text;
        }
      }
    }
  }
  return {text, id};
}

// Sends one piece of feedback; retried with the same id (the server writes it once) if the network fails.
async function sendFeedback(body) {
  body.id = (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random());
  if ($("user").value.trim()) body.user = $("user").value.trim();
  for (let attempt = 0; ; attempt++) {
    let retry = true;
    try {
      const response = await fetch("/v1/feedback", {method: "POST", headers: headers(), body: JSON.stringify(body)});
      if (!response.ok) {
        retry = response.status >= 500;  // a 4xx will not change by sending it again
        throw new Error(await errorText(response));
      }
      $("saved").textContent = "feedback saved ✓";
      setTimeout(() => { $("saved").textContent = ""; }, 3000);
      return true;
    } catch (e) {
      if (!retry || attempt >= 2) { setStatus("Feedback not saved: " + e.message, true); return false; }
      await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
    }
  }
}

function userTurn(text) {
  const turn = el("div", "turn user");
  turn.append(el("span", "role", "you"), el("span", "text", text));
  $("conversation").append(turn);
}

// An assistant turn: its reply (replaceable by a regenerate or an edit) and its feedback buttons.
function assistantTurn(before) {
  const turn = el("div", "turn assistant");
  const text = el("span", "text");
  const actions = el("div", "actions");
  actions.hidden = true;
  turn.append(el("span", "role", "assistant"), text, actions);
  $("conversation").append(turn);
  const state = {turn, text, actions, before, reply: "", id: null, index: before.length};

  const up = el("button", "rate-up", "👍"), down = el("button", "rate-down", "👎");
  const regen = el("button", "regen", "↻ another"), edit = el("button", "edit", "✎ edit");
  up.title = "a good reply"; down.title = "a bad reply"; regen.title = "sample another reply and compare";
  edit.title = "write what it should have said";
  const done = el("span", "done");
  actions.append(up, down, regen, edit, done);

  function rating(value, button) {
    actions.querySelectorAll(".reason-box").forEach((b) => b.remove());
    const box = el("div", "reason-box");
    const reason = el("input", "reason");
    reason.placeholder = "why? (optional) — Enter saves";
    const save = el("button", "save-rating", "save");
    box.append(reason, save);
    actions.append(box);
    reason.focus();
    const submit = async () => {
      if (await sendFeedback({type: "rating", messages: promptMessages(state.before), reply: state.reply,
                              rating: value, reason: reason.value, completion_id: state.id})) {
        box.remove();
        up.classList.toggle("on", value === 1); down.classList.toggle("on", value === -1);
        done.textContent = value === 1 ? "rated good" : "rated bad";
      }
    };
    save.onclick = submit;
    reason.onkeydown = (e) => { if (e.key === "Enter") { e.preventDefault(); submit(); } };
  }
  up.onclick = () => rating(1, up);
  down.onclick = () => rating(-1, down);

  regen.onclick = async () => {
    const pair = el("div", "pair");
    const a = el("div", "option option-a", state.reply), b = el("div", "option option-b", "…");
    pair.append(a, b);
    const choose = el("div", "actions");
    const pickA = el("button", "choose-a", "A is better"), pickB = el("button", "choose-b", "B is better");
    choose.append(pickA, pickB);
    choose.hidden = true;
    turn.insertBefore(pair, actions);
    turn.insertBefore(choose, actions);
    text.hidden = true; actions.hidden = true;
    let other;
    try { other = await streamReply(promptMessages(state.before), b); }
    catch (e) {
      setStatus(e.message, true);
      pair.remove(); choose.remove(); text.hidden = false; actions.hidden = false;
      return;
    }
    choose.hidden = false;
    const pick = async (preferred) => {
      const replies = [state.reply, other.text];
      if (replies[0].trim() && replies[1].trim() && replies[0].trim() !== replies[1].trim()) {
        if (!await sendFeedback({type: "comparison", messages: promptMessages(state.before), replies, preferred,
                                 completion_id: other.id})) return;
      }
      if (preferred === 1) setReply(other.text, other.id);
      pair.remove(); choose.remove(); text.hidden = false; actions.hidden = false;
      done.textContent = "compared";
    };
    pickA.onclick = () => pick(0);
    pickB.onclick = () => pick(1);
  };

  edit.onclick = () => {
    const editor = el("textarea", "editor");
    editor.value = state.reply;
    editor.rows = 3;
    const save = el("button", "save-edit", "save correction");
    const box = el("div", "edit-box");
    box.append(editor, save);
    turn.insertBefore(box, actions);
    editor.focus();
    save.onclick = async () => {
      const edited = editor.value.trim();
      if (!edited || edited === state.reply.trim()) { box.remove(); return; }
      if (await sendFeedback({type: "edit", messages: promptMessages(state.before), reply: state.reply, edited,
                              completion_id: state.id})) {
        setReply(edited, state.id);
        box.remove();
        done.textContent = "corrected";
      }
    };
  };

  function setReply(reply, id) {
    state.reply = reply; state.id = id;
    text.textContent = reply;
    history_[state.index] = {role: "assistant", content: reply};
  }
  state.setReply = setReply;
  return state;
}

async function send(event) {
  event.preventDefault();
  const content = $("input").value.trim();
  if (!content) return;
  $("input").value = "";
  $("send").disabled = $("reset").disabled = true;
  setStatus("");
  const before = history_.concat([{role: "user", content}]);
  userTurn(content);
  history_ = before.concat([{role: "assistant", content: ""}]);
  const state = assistantTurn(before);
  try {
    const reply = await streamReply(promptMessages(before), state.text);
    state.setReply(reply.text, reply.id);
    state.actions.hidden = false;
  } catch (e) {
    setStatus(e.message, true);
    state.turn.remove();
    history_ = before.slice(0, -1);
    $("conversation").lastChild.remove();
    $("input").value = content;
  } finally {
    $("send").disabled = $("reset").disabled = false;
    $("input").focus();
  }
}

$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("reset").onclick = () => { history_ = []; $("conversation").textContent = ""; setStatus(""); };

fetch("/v1/models", {headers: headers()}).then(async (r) => {
  if (!r.ok) throw new Error(await errorText(r));
  const m = (await r.json()).data[0];
  modelId = m.id;
  $("model").textContent = `${m.id} · ${m.stage} step ${m.step}`;
  if (!m.chat) {
    setStatus("This is a pretraining checkpoint: it continues text but does not chat; use /v1/completions.", true);
  }
}).catch((e) => setStatus("Cannot reach the model: " + e.message, true));
