// The labelling page of `python -m gptrl.label`: plain JavaScript, no libraries, nothing from the internet.
// State: the question on screen, the reply indices ranked so far (best first) and those not ranked yet.
"use strict";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
if (query.get("token")) {  // keep the access token for this tab only, out of the address bar and its history
  sessionStorage.setItem("gptrl-label-token", query.get("token"));
  history.replaceState(null, "", location.pathname);
}
const TOKEN = sessionStorage.getItem("gptrl-label-token") || "";
// Where the team names itself (--names), this tab's labeller, asked once and kept for the tab.
let NAME = sessionStorage.getItem("gptrl-label-name") || "";

function headers(extra) {
  const h = {...(extra || {})};
  if (TOKEN) h.Authorization = "Bearer " + TOKEN;
  if (NAME) h["X-Labeller"] = encodeURIComponent(NAME);
  return h;
}
const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

let question = null;  // {prompt_id, where, messages: [{role, content}], replies: [str], dropped}
let ranked = [];      // reply indices, best first
let pool = [];        // reply indices not ranked yet, in the order they were sampled
let busy = false;     // a submission is on its way
let pollTimer = null;
let heartbeat = 30;   // seconds between the page's "still here" while a prompt is shown (the server says)

function ordinal(n) {
  const s = ["th", "st", "nd", "rd"], v = n % 100;
  return n + (s[(v - 20) % 10] || s[v] || s[0]);
}

// ---------------------------------------------------------------------------------------------
// Talking to the server.

async function refresh() {
  clearTimeout(pollTimer);
  let state, response;
  try {
    response = await fetch("/api/state", {cache: "no-store", headers: headers()});
    state = await response.json();
  } catch (err) {
    showStatus("Cannot reach the labelling server; retrying…", "error");
    pollTimer = setTimeout(refresh, 2000);
    return;
  }
  if (response.status === 401 || response.status === 403) {  // no retry helps: the address needs its ?token=
    showStatus(state.error || "Not allowed (HTTP " + response.status + ").", "error");
    return;
  }
  heartbeat = state.heartbeat_s || heartbeat;
  showProgress(state.progress, state.team);
  showWho(state);
  if (state.status === "name") {
    question = null;
    $("task").hidden = true;
    $("status").hidden = true;
    $("who").hidden = false;
    $("who-problem").textContent = NAME ? state.message : "";
    $("name").focus();
    return;
  }
  $("who").hidden = true;
  if (state.status === "ready") {
    // (While a decision is on its way, the question stays: the look after it decides.)
    if (!busy && (!question || question.prompt_id !== state.question.prompt_id)) {
      if (question) say("Your prompt went to another labeller while this page was away; here is another.", "error");
      showQuestion(state.question);
      if ($("team").open) loadTeam();
    }
    pollTimer = setTimeout(refresh, heartbeat * 1000);  // keeps the prompt this labeller's
  } else if (state.status === "done") {
    question = null;
    $("task").hidden = true;
    $("status").hidden = true;
    $("finished").hidden = false;
    $("finished-text").textContent = `Every prompt is labelled or skipped. The records are in ${state.out}.`;
  } else {
    question = null;
    $("task").hidden = true;
    if (state.status === "error") {
      showStatus(`The server stopped: ${state.message}. See its log.`, "error");
      pollTimer = setTimeout(refresh, 5000);
    } else {
      const what = state.message ? state.message[0].toUpperCase() + state.message.slice(1) : "Waiting";
      showStatus(`${what}…`);
      pollTimer = setTimeout(refresh, 700);
    }
  }
}

async function send(url, body) {
  if (busy) return;
  busy = true;
  updateButtons();
  say("Saving…");
  let problem = "";
  for (let attempt = 0; attempt < 5; attempt++) {
    if (attempt) await new Promise((resolve) => setTimeout(resolve, 500 * 2 ** attempt));
    let response, reply;
    try {
      response = await fetch(url, {method: "POST", headers: headers({"Content-Type": "application/json"}),
                                   body: JSON.stringify(body)});
      reply = await response.json();
    } catch (err) {
      problem = "the server does not answer";
      continue;  // the same prompt id again: the server writes a decision once, however often it is sent
    }
    if (response.ok) {
      busy = false;
      question = null;
      say(reply.action === "skipped" ? "Skipped." : "Saved.", "ok");
      refresh();
      return;
    }
    if (response.status === 409) {  // it went to another labeller meanwhile: show what is current
      busy = false;
      question = null;
      say("That prompt is no longer yours (it went to another labeller); here is the current one.");
      refresh();
      return;
    }
    problem = reply.error || `error ${response.status}`;
    if (response.status === 400) break;  // sending the same again will not help
  }
  busy = false;
  say(`Not saved: ${problem}. Your ranking is still here; try again.`, "error");
  updateButtons();
}

function submit() {
  if (!question || busy || !canSubmit()) return;
  send("/api/submit", {prompt_id: question.prompt_id, ranking: ranked.concat(pool), better_reply: $("better").value});
}

function skip() {
  if (!question || busy) return;
  send("/api/skip", {prompt_id: question.prompt_id});
}

// ---------------------------------------------------------------------------------------------
// Drawing.

function showStatus(text, kind) {
  $("status").hidden = false;
  $("status").className = "status" + (kind ? " " + kind : "");
  $("status-text").textContent = text;
  $("finished").hidden = true;
}

function showProgress(p, team) {
  const el = $("progress");
  el.textContent = "";
  if (!p) return;
  const b = document.createElement("b");
  b.textContent = String(p.submitted + p.skipped);
  el.append(b, ` / ${p.total} done · ${p.submitted} labelled · ${p.skipped} skipped`);
  if (team && team.overlap > 1) {
    el.append(` · team: ${team.complete} / ${team.total} prompts ranked by ${team.overlap} labellers`);
  }
}

function showWho(state) {
  $("whoami").textContent = state.labeller ? `Labelling as ${state.labeller}` : "";
  $("change-name").hidden = !NAME;
}

function setName(event) {
  event.preventDefault();
  const name = $("name").value.trim();
  if (!name) return;
  NAME = name;
  sessionStorage.setItem("gptrl-label-name", NAME);
  refresh();
}

function changeName() {
  if (busy) return;
  NAME = "";
  sessionStorage.removeItem("gptrl-label-name");
  $("name").value = "";
  refresh();
}

// The team view: every labeller's work and how alike they rank (GET /api/team), loaded when opened.
async function loadTeam() {
  let team;
  try {
    const response = await fetch("/api/team", {cache: "no-store", headers: headers()});
    team = await response.json();
    if (!response.ok) throw new Error(team.error || `error ${response.status}`);
  } catch (err) {
    $("team-body").textContent = `Cannot load the team view: ${err.message}`;
    return;
  }
  const share = (a, n) => (a === undefined || a === null ? "–" : `${(100 * a).toFixed(0)}% of ${n}`);
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  const judged = team.judge.length > 0;
  for (const title of ["Labeller", "Labelled", "Skipped", "Working on", "Agrees with the others",
                       ...(judged ? [`Agrees with the judge (${team.judge.join(", ")})`] : [])]) {
    const th = document.createElement("th");
    th.textContent = title;
    head.append(th);
  }
  const body = table.createTBody();
  for (const row of team.labellers) {
    const tr = body.insertRow();
    tr.dataset.name = row.name;
    const cells = [row.name, row.submitted, row.skipped,
                   row.holding ? `${row.holding} (quiet ${Math.round(row.quiet_s)} s)` : "–",
                   share(row.agreement, row.compared),
                   ...(judged ? [share(row.judge_agreement, row.judge_compared)] : [])];
    for (const value of cells) tr.insertCell().textContent = String(value);
  }
  const a = team.agreement;
  const summary = document.createElement("p");
  summary.id = "team-summary";
  summary.textContent = `${team.complete} / ${team.total} prompts ranked by ${team.overlap} labeller(s). ` +
    (a.compared ? `Reply pairs ordered alike: ${(100 * a.agreement).toFixed(1)}% over ${a.compared} comparisons ` +
                  `(${a.shared_units} pairs judged twice or more); Krippendorff's alpha ` +
                  (a.alpha === null ? "–" : a.alpha.toFixed(3)) + "."
                : "No reply pair has been ranked by two labellers yet.");
  $("team-body").replaceChildren(table, summary);
}

function say(text, kind) {
  $("message").textContent = text;
  $("message").className = kind || "";
}

function showQuestion(q) {
  question = q;
  ranked = [];
  pool = q.replies.map((_, i) => i);
  $("status").hidden = true;
  $("finished").hidden = true;
  $("task").hidden = false;
  $("prompt-id").textContent = q.prompt_id;
  $("where").textContent = q.where ? `from ${q.where}` : "";
  $("better").value = "";
  const prompt = $("prompt");
  prompt.textContent = "";
  for (const m of q.messages) {
    const turn = document.createElement("div");
    turn.className = `turn ${m.role}`;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role;
    turn.append(role, m.content);
    prompt.append(turn);
  }
  const notes = [];
  if (q.dropped) notes.push(`${q.dropped} of the ${q.dropped + q.replies.length} sampled replies were empty or ` +
                            "repeated and are not shown.");
  if (q.replies.length < 2) notes.push(`Nothing to rank: ${q.replies.length} distinct reply. Write a better ` +
                                       "reply and submit, or skip.");
  $("dropped").hidden = !notes.length;
  $("dropped").textContent = notes.join(" ");
  render();
  window.scrollTo(0, 0);
}

function render() {
  const focusedIndex = document.activeElement && document.activeElement.closest(".card")
    ? document.activeElement.closest(".card").dataset.index : null;
  const rankedList = $("ranked"), poolList = $("pool");
  rankedList.textContent = "";
  poolList.textContent = "";
  rankedList.dataset.empty = "Click or drag replies here, best first.";
  poolList.dataset.empty = ranked.length ? "All ranked." : "";
  ranked.forEach((i, r) => rankedList.append(card(i, "ranked", r)));
  pool.forEach((i) => poolList.append(card(i, "pool")));
  if (focusedIndex !== null) {
    const again = document.querySelector(`.card[data-index="${focusedIndex}"]`);
    if (again) again.focus();
  }
  updateButtons();
}

function card(i, place, rank) {
  const li = document.createElement("li");
  li.className = "card";
  li.tabIndex = 0;
  li.dataset.index = i;
  const isLast = place === "pool" && pool.length === 1 && ranked.length > 0;
  if (isLast) li.classList.add("last");
  li.setAttribute("aria-label", `Reply ${LETTERS[i]}, ` + (place === "ranked" ? `ranked ${ordinal(rank + 1)}` :
                                                            isLast ? "last" : "not ranked"));
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = place === "ranked" ? ordinal(rank + 1) : isLast ? "last" : "–";
  const letter = document.createElement("span");
  letter.className = "letter";
  letter.textContent = LETTERS[i] || "?";
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = question.replies[i];
  const tools = document.createElement("span");
  tools.className = "tools";
  if (place === "ranked") {
    tools.append(button("↑", `Move reply ${LETTERS[i]} up`, () => move(i, -1), rank === 0),
                 button("↓", `Move reply ${LETTERS[i]} down`, () => move(i, +1), rank === ranked.length - 1),
                 button("✕", `Unrank reply ${LETTERS[i]}`, () => unrank(i)));
  } else {
    tools.append(button(`Rank ${ordinal(ranked.length + 1)}`, `Rank reply ${LETTERS[i]} next`, () => rankNext(i)));
  }
  li.append(badge, letter, text, tools);
  li.addEventListener("pointerdown", (e) => startDrag(e, li));
  return li;
}

function button(label, title, action, disabled) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.setAttribute("aria-label", title);
  b.disabled = !!disabled;
  b.addEventListener("click", (e) => { e.stopPropagation(); action(); });
  return b;
}

function canSubmit() {
  if (!question) return false;
  if (question.replies.length >= 2) return pool.length <= 1;  // the one left is the worst
  return $("better").value.trim().length > 0;
}

function updateButtons() {
  $("submit").disabled = busy || !canSubmit();
  $("skip").disabled = busy || !question;
}

// ---------------------------------------------------------------------------------------------
// Ranking.

function rankNext(i) {
  if (!pool.includes(i)) return;
  pool = pool.filter((j) => j !== i);
  ranked.push(i);
  render();
}

function unrank(i) {
  if (!ranked.includes(i)) return;
  ranked = ranked.filter((j) => j !== i);
  pool = pool.concat([i]).sort((a, b) => a - b);
  render();
}

function move(i, delta) {
  const at = ranked.indexOf(i), to = at + delta;
  if (at < 0 || to < 0 || to >= ranked.length) return;
  ranked.splice(at, 1);
  ranked.splice(to, 0, i);
  render();
}

// Dragging with pointer events (mouse, pen and touch alike): the card moves through the lists as the pointer
// does; on release the lists' order becomes the ranking. A press without movement is a click: rank next.
let drag = null;

function startDrag(e, li) {
  if (busy || e.button !== 0 || e.target.closest("button")) return;
  drag = {li, x: e.clientX, y: e.clientY, moving: false};
  document.addEventListener("pointermove", onDragMove);
  document.addEventListener("pointerup", onDragEnd);
  document.addEventListener("pointercancel", onDragCancel);
}

function listUnder(y) {
  const lists = [$("ranked"), $("pool")];
  let best = lists[0], distance = Infinity;
  for (const list of lists) {
    const r = list.getBoundingClientRect();
    const d = y < r.top ? r.top - y : y > r.bottom ? y - r.bottom : 0;
    if (d < distance) { best = list; distance = d; }
  }
  return best;
}

function onDragMove(e) {
  if (!drag) return;
  if (!drag.moving && Math.hypot(e.clientX - drag.x, e.clientY - drag.y) < 6) return;
  drag.moving = true;
  drag.li.classList.add("dragging");
  e.preventDefault();
  const list = listUnder(e.clientY);
  const others = [...list.children].filter((c) => c !== drag.li);
  const before = others.find((c) => { const r = c.getBoundingClientRect(); return e.clientY < r.top + r.height / 2; });
  if (drag.li.parentNode !== list || drag.li.nextSibling !== (before || null)) list.insertBefore(drag.li, before || null);
}

function endDrag() {
  document.removeEventListener("pointermove", onDragMove);
  document.removeEventListener("pointerup", onDragEnd);
  document.removeEventListener("pointercancel", onDragCancel);
  const d = drag;
  drag = null;
  return d;
}

function onDragEnd() {
  const d = endDrag();
  if (!d) return;
  const i = Number(d.li.dataset.index);
  if (!d.moving) {  // a click
    if (pool.includes(i)) rankNext(i);
    return;
  }
  const order = (list) => [...list.children].map((c) => Number(c.dataset.index));
  ranked = order($("ranked"));
  pool = order($("pool")).sort((a, b) => a - b);
  render();
}

function onDragCancel() {
  if (endDrag()) render();
}

// ---------------------------------------------------------------------------------------------
// Keyboard: letters rank, Backspace undoes, Escape resets, Alt+arrows move the focused reply,
// Ctrl+Enter submits, Alt+S skips. Letters are left alone while typing in the text box.

document.addEventListener("keydown", (e) => {
  if (!question || busy) return;
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); submit(); return; }
  if (e.altKey && e.code === "KeyS") { e.preventDefault(); skip(); return; }
  if (e.target.closest && e.target.closest("textarea, input")) return;
  const focused = e.target.closest && e.target.closest(".card");
  const i = focused ? Number(focused.dataset.index) : -1;
  if (focused && e.altKey && (e.key === "ArrowUp" || e.key === "ArrowDown")) {
    e.preventDefault();
    if (pool.includes(i)) rankNext(i); else move(i, e.key === "ArrowUp" ? -1 : +1);
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (focused && (e.key === "Enter" || e.key === " ") && e.target === focused) {
    e.preventDefault();
    if (pool.includes(i)) rankNext(i); else unrank(i);
    return;
  }
  if (focused && e.key === "Delete") { e.preventDefault(); unrank(i); return; }
  if (e.key === "Backspace") { e.preventDefault(); if (ranked.length) unrank(ranked[ranked.length - 1]); return; }
  if (e.key === "Escape") { e.preventDefault(); ranked.slice().reverse().forEach(unrank); return; }
  if (e.key.length === 1) {
    const letter = LETTERS.indexOf(e.key.toUpperCase());
    if (letter >= 0 && letter < question.replies.length) { e.preventDefault(); rankNext(letter); }
  }
});

$("submit").addEventListener("click", submit);
$("who-form").addEventListener("submit", setName);
$("change-name").addEventListener("click", changeName);
$("team").addEventListener("toggle", () => { if ($("team").open) loadTeam(); });
$("skip").addEventListener("click", skip);
$("better").addEventListener("input", updateButtons);
$("copy-best").addEventListener("click", () => {
  if (!question || !question.replies.length) return;
  const box = $("better");
  if (box.value.trim()) { say("The box already holds text; clear it first to start from the best reply."); return; }
  box.value = question.replies[ranked.length ? ranked[0] : pool[0]];
  box.focus();
  updateButtons();
});

refresh();
