// tuneloop's routing for nginx (njs 0.7+; written for 0.7.9, hence no for...of): the stable model name clients call is an alias
// that maps to immutable, versioned LoRA names with weights. The route table is a JSON file
// that tuneloop rewrites atomically (write + rename); it is read on every request, so a flip
// takes effect on the next request with no nginx reload and no dropped connection.
//
//   {"aliases": {"tuneloop": {"routes": [{"name": "tuneloop-v3", "weight": 90},
//                                         {"name": "tuneloop-v4", "weight": 10}],
//                             "capture": {"tuneloop-v4": 0.25}}},
//    "upstreams": ["127.0.0.1:8000", "127.0.0.1:8001"]}
//
// A request whose "model" is not an alias (a version name, the base model) passes unchanged.
// "capture" logs that share of a version's answers (for the canary's bake), each with its
// request's messages and sampling settings (so the bake can ask the previous version the same
// question); no other answer or request is ever written to the log.

const fs = require('fs');

function table(r) {
    try {
        return JSON.parse(fs.readFileSync(r.variables.tl_routes_file));
    } catch (e) {
        r.error('tuneloop gateway: cannot read the route table ' + r.variables.tl_routes_file + ': ' + e);
        return null;
    }
}

function pick(routes) {
    let total = 0;
    for (let i = 0; i < routes.length; i++) {
        total += Math.max(0, routes[i].weight || 0);
    }
    if (total <= 0) {
        return null;
    }
    let x = Math.random() * total;
    for (let i = 0; i < routes.length; i++) {
        x -= Math.max(0, routes[i].weight || 0);
        if (x < 0) {
            return routes[i].name;
        }
    }
    return routes[routes.length - 1].name;
}

// $tl_upstream: one ready replica, at random. Evaluated before the body is read.
function upstream(r) {
    const t = table(r);
    const ups = (t && t.upstreams) || [];
    if (!ups.length) {
        return '127.0.0.1:1';  // no ready replica: the connection is refused and nginx answers 502
    }
    return ups[Math.floor(Math.random() * ups.length)];
}

// $tl_retry: another ready replica than the one(s) that just answered 404 (a restarted server
// that does not hold the version yet), 500 (a server stopping mid-request) or 502/503 (a
// server that is down or starting).
function retry(r) {
    const t = table(r);
    const ups = (t && t.upstreams) || [];
    const tried = String(r.variables.upstream_addr || '');
    const others = ups.filter(function (u) { return tried.indexOf(u) < 0; });
    if (!others.length) {
        return ups.length ? ups[0] : '127.0.0.1:1';
    }
    return others[Math.floor(Math.random() * others.length)];
}

// $tl_body: the request body with an alias replaced by the version the weights pick.
function body(r) {
    const text = r.requestText;
    if (!text) {
        return '';
    }
    let request;
    try {
        request = JSON.parse(text);
    } catch (e) {
        return text;  // not JSON: vLLM answers it (400), as without the gateway
    }
    const t = table(r);
    const alias = t && t.aliases && typeof request.model === 'string' ? t.aliases[request.model] : undefined;
    if (!alias || !alias.routes || !alias.routes.length) {
        r.variables.tl_version = typeof request.model === 'string' ? request.model : '';
        return text;
    }
    const version = pick(alias.routes);
    if (version === null) {
        return text;
    }
    r.variables.tl_alias = request.model;
    r.variables.tl_version = version;
    const share = alias.capture ? alias.capture[version] : undefined;
    if (share && Math.random() < share) {
        r.variables.tl_capture = '1';
        const asked = JSON.stringify({messages: request.messages, prompt: request.prompt,
                                      max_tokens: request.max_tokens, temperature: request.temperature});
        if (asked.length <= 32768) {  // longer: the answer is still checked, just not re-asked
            r.variables.tl_request = asked;
        }
    }
    request.model = version;
    return JSON.stringify(request);
}

// Keeps (at most 16 KiB of) a sampled answer for the access log; passes every byte on.
function capture(r, data, flags) {
    if (r.variables.tl_capture === '1' && r.variables.tl_answer.length < 16384) {
        r.variables.tl_answer = r.variables.tl_answer + data;
    }
    r.sendBuffer(data, flags);
}

export default {upstream, retry, body, capture};
