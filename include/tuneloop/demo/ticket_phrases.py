"""The ticket world's words: each product's slots, the intent sentences that decide each label
(generic ones, and product ones in the product's own words: the drift is mostly here), label
weights per product, greetings, closings, context, and the agent's clarifying questions."""

from __future__ import annotations

# --- vocabulary ----------------------------------------------------------------------------
# fmt: off
# Slots: {thing} the product as customers name it, {model}/{other_model} a hardware model,
# {plan} a paid plan, {device} the customer's own phone or computer, {version} a software
# version, {amount}, {n}, {m}, {order}, {when}, {month}, {first}, {last}, {year}, plus
# {action}, {symptom}, {error}, {wish}, {wish_noun} from the product's own lists.
_PRODUCT_SLOTS: dict[str, dict[str, tuple[str, ...]]] = {
    "nimbus": {
        "thing": ("Nimbus", "the Nimbus app", "our Nimbus workspace", "Nimbus desktop", "the Nimbus web app"),
        "model": ("Nimbus",),
        "plan": ("Nimbus Team", "Nimbus Pro", "Nimbus Business", "Nimbus Starter"),
        "device": ("Windows laptop", "MacBook", "iPhone", "Android phone", "iPad", "Chromebook"),
        "version": ("4.2", "4.3.1", "5.0", "5.0.2", "5.1"),
        "action": (
            "open a shared folder", "export a note to PDF", "sync on my phone", "paste an image",
            "upload a big file", "search my notes", "switch workspaces",
        ),
        "symptom": (
            "notes don't sync between my laptop and my phone",
            "edits vanish after I close the app",
            "search finds nothing even though the note is there",
            "the desktop app opens to a blank white screen",
            "attachments show up as broken links",
            "the shared folder shows old versions of every file",
        ),
        "error": ("Sync failed (code 502)", "Something went wrong", "Workspace unavailable", "E_SYNC_CONFLICT"),
        "wish": (
            "lock a note so others can't edit it", "set reminders on a note",
            "export a whole folder as Markdown", "show word counts", "color code folders",
        ),
        "wish_noun": (
            "a dark mode for the desktop app", "offline mode for shared folders", "calendar integration",
            "templates for meeting notes", "tags on folders", "a Linux desktop app",
        ),
    },
    "beacon": {
        "thing": ("my Beacon router", "the Beacon", "my Beacon Mesh kit", "the Beacon satellite", "the Beacon app"),
        "model": ("Beacon Mesh 3-pack", "Beacon AX3000", "Beacon Mini", "Beacon Pro 6E", "Beacon satellite"),
        "plan": ("Beacon Shield", "Beacon Shield Plus", "Beacon Care"),
        "device": ("laptop", "smart TV", "game console", "iPhone", "Android phone", "work PC"),
        "version": ("2.8.1", "2.9", "3.0.4", "3.1", "3.1.2"),
        "action": (
            "stream on the TV", "run a speed test", "add a new satellite", "open the Beacon app",
            "join a video call", "reboot the router",
        ),
        "symptom": (
            "the internet drops every few hours and the light blinks red",
            "the satellite won't connect to the main router",
            "the 5 GHz network disappeared",
            "the Beacon app says the router is offline but wifi works",
            "speed falls to 2 Mbps every evening",
            "devices keep getting kicked off the wifi",
        ),
        "error": ("Router unreachable", "Setup failed: code 17", "No internet (DNS error)", "Firmware update failed"),
        "wish": (
            "pause the wifi for the kids at bedtime", "limit speed per device",
            "schedule the guest network", "see which device uses the most data",
        ),
        "wish_noun": (
            "a guest network schedule", "per-device speed limits", "WPA3 on the Mini",
            "a parental controls timer", "a web dashboard instead of only the app",
        ),
    },
    "orbit": {
        "thing": ("my Orbit watch", "the Orbit", "my Orbit band", "the Orbit app", "my new Orbit"),
        "model": ("Orbit 2", "Orbit Sport", "Orbit Lite", "Orbit Pro 45mm", "Orbit 2 strap"),
        "plan": ("Orbit Coach", "Orbit Care+", "Orbit Coach annual"),
        "device": ("iPhone", "Android phone", "Pixel", "Galaxy phone", "iPad"),
        "version": ("1.4", "1.5.2", "2.0", "2.0.1", "2.1"),
        "action": (
            "start a GPS run", "change the watch face", "pair it over bluetooth", "put it on the charging puck",
            "log a swim", "check my heart rate",
        ),
        "symptom": (
            "the step count resets to zero at noon",
            "the heart rate reads 190 while I'm sitting on the sofa",
            "the battery dies in six hours",
            "the watch face freezes and the screen goes black",
            "GPS tracking stops after ten minutes of running",
            "it stopped charging on the puck",
            "sleep tracking shows I slept 0 hours",
        ),
        "error": ("Pairing failed", "Sensor error 4", "Sync timeout", "Watch not responding"),
        "wish": (
            "track swimming laps", "design my own watch faces", "reply to texts from the watch",
            "export my sleep data", "see the weather on the watch face",
        ),
        "wish_noun": (
            "swim tracking", "custom watch faces", "offline music on the watch", "a sleep score export",
            "more strap colors",
        ),
    },
}

_COMMON_SLOTS: dict[str, tuple[str, ...]] = {
    "when": (
        "yesterday", "this morning", "last Tuesday", "two weeks ago", "over the weekend",
        "at the start of the month", "three days ago", "last night",
    ),
    "month": ("January", "February", "March", "April", "May", "June", "July", "August"),
    "first": ("Dana", "Sam", "Priya", "Tom", "Grace", "Luis", "Mei", "Ahmed", "Kate", "Jonas"),
    "last": ("Porter", "Reyes", "Patel", "Brooks", "Lin", "Ellis", "Novak", "Okafor"),
    "currency": ("$", "€", "£"),
}

# Intent sentences per label: what decides the label. Generic ones fit every product that can
# have the label; product ones use the product's own words (the drift is mostly here).
_INTENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "billing": {
        "any": (
            "I was charged twice for {plan} this month.",
            "There's a charge of {amount} on my card that I don't recognise.",
            "My invoice for {month} shows the wrong amount.",
            "Can I get a refund for the double payment?",
            "You billed me {amount} but the price on your site is lower.",
            "How do I update the credit card you bill every month?",
            "my payment failed and now there is a late fee, why??",
            "I need a receipt for my last payment, the invoice page is empty.",
            "why did my subscription price go up to {amount}?",
            "got billed {amount} even though my free trial wasn't over",
            "The {plan} renewal took money from my card twice.",
        ),
        "nimbus": (
            "we were billed for {n} seats but we only have {m} people on the team",
            "The annual {plan} renewal charged our company card {amount}.",
            "Our invoice still lists seats for people we removed in {month}.",
        ),
        "beacon": (
            "I was charged for {plan} but I never signed up for it.",
            "The {plan} renewal cost {amount} instead of the promo price.",
        ),
        "orbit": (
            "{plan} charged me {amount} after the free month.",
            "I paid for {plan} twice when I set up the watch.",
            "the Orbit app billed me {amount} for Coach, I only wanted the trial",
            "My Orbit Coach trial turned into a paid plan and took {amount}.",
            "Why is there an Orbit Coach fee every month when I paid for the year?",
        ),
    },
    "bug": {
        "any": (
            "{thing} keeps crashing when I {action}.",
            "I get the error '{error}' every time I {action}.",
            "Since the update to {version}, {symptom}.",
            "{symptom} and I have no idea why.",
            "Something is broken: {symptom}.",
            "{thing} freezes when I {action} and I have to restart it.",
            "it doesn't work anymore, {symptom}",
        ),
        "nimbus": (
            "Nimbus on my {device} shows '{error}' and won't sync.",
            "the desktop app crashes on startup since version {version}",
        ),
        "beacon": (
            "After the firmware update {version} {symptom}.",
            "The {model} reboots by itself several times a day.",
        ),
        "orbit": (
            "My {model} won't pair with my {device} over bluetooth.",
            "The heart rate sensor on my {model} gives crazy readings.",
            "since watch update {version} {symptom}",
            "The {model} buzzes all night even with do not disturb on.",
            "My watch shows the wrong time after every sync.",
            "The wrist sensor says 'refit your strap' every five minutes.",
        ),
    },
    "account_access": {
        "any": (
            "I can't log in to my account.",
            "The password reset email never arrives.",
            "I'm locked out after too many sign-in attempts.",
            "My two-factor codes stopped working since I got a new phone.",
            "I forgot my password and the reset link says it expired.",
            "How do I change the email address I use to sign in?",
            "It says my account is disabled and I can't get in.",
            "I think someone else logged into my account, how do I secure it?",
            "cant login, it says wrong password but I just reset it",
        ),
        "nimbus": (
            "I can't sign in to our workspace with Google single sign-on.",
            "Our workspace admin left and now nobody can log in as admin.",
        ),
        "beacon": (
            "I can't log in to the Beacon app to manage my router.",
            "I forgot the admin password for the router settings page.",
        ),
        "orbit": (
            "The Orbit app won't let me sign in, so my watch can't sync.",
            "I made a second Orbit account by mistake and can't get back into my old one.",
            "My watch asks me to sign in again every morning and the login code never comes.",
            "After a factory reset I can't get into the Orbit app with my old login.",
        ),
    },
    "feature_request": {
        "any": (
            "It would be great if {thing} could {wish}.",
            "Please add {wish_noun}.",
            "Any plans to support {wish_noun}?",
            "Feature idea: {wish_noun}.",
            "I'd love an option to {wish}.",
            "Would you consider adding {wish_noun}? It would save me a lot of time.",
            "suggestion: let us {wish}",
            "Is there a way to {wish}? If not, please build it.",
        ),
        "nimbus": ("Our team really needs {wish_noun} in Nimbus.",),
        "beacon": ("The Beacon app should let me {wish}.",),
        "orbit": (
            "The {model} would be perfect with {wish_noun}.",
            "Can the watch show my calendar? That would be a great addition.",
            "I wish the {model} had a flashlight mode.",
        ),
    },
    "shipping": {
        "any": (
            "My order {order} still hasn't arrived.",
            "Tracking has said 'in transit' for {n} days now.",
            "The package was marked delivered but it's not here.",
            "The box arrived damaged and the {model} inside is cracked.",
            "Can I change the delivery address on order {order}?",
            "You sent the wrong item, I ordered the {model} and got the {other_model}.",
            "When will my {model} ship? It has been on backorder for weeks.",
            "the courier left my parcel at the wrong house",
            "where is my order?? {order}, paid {when}",
        ),
        "beacon": ("My {model} was delivered without the power adapter in the box.",),
        "orbit": (
            "The {model} came without the charging puck in the box.",
            "The {model} I ordered is stuck at the customs depot.",
            "My watch was delivered to my neighbour's address and they moved away.",
        ),
    },
    "cancellation": {
        "any": (
            "Please cancel my {plan} subscription.",
            "I want to close my account and delete my data.",
            "How do I stop auto-renewal? I don't want to continue after {month}.",
            "Cancel my membership please, I don't use it anymore.",
            "I'd like to cancel, how do I end my plan?",
            "please end {plan} at the end of this month, I'm leaving",
        ),
        "nimbus": (
            "We're switching to another notes app, please cancel {plan} and remove all seats.",
            "Please close our Nimbus workspace, the project is over.",
        ),
        "beacon": (
            "I want to end my {plan} subscription, I don't need it.",
            "I'd like to return the {model} within 30 days and cancel the plan.",
        ),
        "orbit": (
            "Cancel {plan} before the next month starts.",
            "I want to send my {model} back and cancel everything.",
            "Please stop my {plan} plan, I don't want to be a member anymore.",
            "I'm returning the watch, so please close my Orbit account.",
        ),
    },
}

# How often each label occurs per product; nimbus is software and has no shipping.
_LABEL_WEIGHTS: dict[str, dict[str, int]] = {
    "nimbus": {"billing": 22, "bug": 26, "account_access": 20, "feature_request": 14, "shipping": 0, "cancellation": 18},
    "beacon": {"billing": 17, "bug": 24, "account_access": 14, "feature_request": 12, "shipping": 19, "cancellation": 14},
    "orbit": {"billing": 17, "bug": 25, "account_access": 13, "feature_request": 14, "shipping": 18, "cancellation": 13},
}

_GREETINGS = ("", "", "Hi,", "Hello,", "Hey", "Hi there,", "Good morning,", "hello team,", "Hi support,", "Dear Brightwave,")

_CLOSINGS = (
    "", "", "", "Thanks.", "Thank you!", "thx", "Please help.", "Any help appreciated.",
    "Cheers, {first}", "Regards, {first} {last}", "This is really annoying.", "Thanks in advance!",
)

# Neutral context, some with another label's words as a distractor (order, account, restart).
_CONTEXT = (
    "I've had {thing} since {year}.",
    "I'm on the {plan} plan.",
    "This is for my small business.",
    "I mostly use it on my {device}.",
    "I already tried turning everything off and on again.",
    "My order number was {order} if that matters.",
    "My account name is {first} {last}.",
    "Otherwise I really like the product.",
    "I asked in the forum {when} and nobody answered.",
    "Sorry if this is the wrong place to ask.",
)

_VAGUE_OPENERS = (
    "Hi, I need help with {thing}.",
    "hey, got a problem with {thing}",
    "Hello, I have a question about {thing}.",
    "Can someone help me with {thing}?",
    "hi is anyone there? it's about {thing}",
    "I need support please, {thing}.",
)

_CLARIFY = (
    "Thanks for reaching out! Could you tell me a bit more about what's happening?",
    "Happy to help. What seems to be the problem?",
    "Hi! Sure, what can I do for you today?",
    "Sorry to hear that. Can you describe the issue in a little more detail?",
)

# The agent's follow-up question and the customer's answers to it: details, no label cue
# (the account question is another distractor).
_FOLLOW_UPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Thanks for the details. Which model or plan is this about?",
        ("It's the {model}.", "{plan}.", "The {model}, and I'm on {plan}.", "the {model} i think"),
    ),
    (
        "Got it. When did you first notice this?",
        ("{when}.", "Only {when}.", "{when}, on my {device}.", "Not sure, maybe {when}"),
    ),
    (
        "Understood. Can you confirm the name on the account?",
        ("{first} {last}.", "It's {first} {last}.", "{first} {last}, same as always"),
    ),
)
# fmt: on
