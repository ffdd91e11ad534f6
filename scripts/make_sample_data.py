#!/usr/bin/env python3
"""Writes sample_data/: a small offline-inference job in both input formats, deterministic (seed 0).

Three jobs in one file, interleaved as real files are: support tickets labelled under one long instruction
block (chat), questions asked of documents (several per document), and a few-shot eval (one shared header).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SUPPORT_SYSTEM = (
    "You are a support triage assistant for Northwind Cloud, a company that sells hosted databases, object "
    "storage and a managed Kubernetes service. Read the customer's ticket and answer with exactly one label "
    "from this list: billing, outage, performance, access, feature-request, data-loss, other. Use billing for "
    "invoices, refunds, plan changes and payment failures. Use outage when a service is unreachable or returns "
    "errors for many users. Use performance when it works but slowly. Use access for logins, passwords, API "
    "keys, roles and single sign-on. Use feature-request when the customer asks for something the product "
    "does not do. Use data-loss when data was deleted, corrupted or cannot be restored. Use other for "
    "everything else. Do not explain your answer. Do not add punctuation."
)
FEW_SHOT = [
    ("My card was charged twice for the March invoice.", "billing"),
    ("Our cluster in eu-west has returned 503 for every request since 09:10 UTC.", "outage"),
    ("Could you add support for PostgreSQL 17 extensions?", "feature-request"),
]
TICKET_PARTS = {
    "who": ["Our team", "I", "My manager", "The on-call engineer", "A customer of ours", "Our CI pipeline"],
    "what": [
        "cannot log in to the console after the password reset",
        "sees queries taking ten seconds that took 200 ms last week",
        "was billed for a plan we cancelled in January",
        "gets connection refused from the object storage endpoint",
        "lost the rows written between 14:00 and 14:20 after the failover",
        "would like to export audit logs to our own bucket",
        "needs an invoice with our VAT number on it",
        "finds that API keys created today are rejected with 401",
        "reports that the Kubernetes dashboard shows no nodes",
        "noticed backups from last night cannot be restored",
    ],
    "when": ["since this morning", "after yesterday's maintenance", "for two days now", "intermittently",
             "every night around midnight", "right after we upgraded the client library"],
    "extra": ["Please help.", "This is blocking a release.", "Is there a status page for this?",
              "We are on the enterprise plan.", "Ticket number 4471 was closed without an answer.", ""],
}
DOCUMENTS = {
    "lighthouse": "The Pelican Point lighthouse was built in 1872 on a basalt headland at the mouth of the "
    "Ardent River. Its first lens, a second-order Fresnel lens made in Paris, was lit with whale oil and later "
    "with kerosene. In 1931 the station was electrified, and the keepers' cottage became a small museum after "
    "the light was automated in 1968. The tower is 31 metres tall and its light can be seen 22 nautical miles "
    "out to sea. Storms in 1899 and 1953 damaged the gallery, and the second repair replaced the iron railing "
    "with bronze. The museum now holds the keepers' logbooks, which record every ship that passed in fog.",
    "sourdough": "A sourdough starter is a culture of wild yeast and lactic acid bacteria kept in flour and "
    "water. Fed once a day at room temperature, a healthy starter doubles in four to eight hours and smells "
    "pleasantly sour. Bakers usually mix 20 percent starter by flour weight into the dough, let it rise for "
    "four to six hours, shape it, and proof it overnight in the refrigerator. The long cold proof develops "
    "flavour and makes the dough easier to score. Bread baked in a preheated cast-iron pot at 250 degrees "
    "Celsius, lid on for twenty minutes and off for twenty more, gets a thick, blistered crust.",
    "glacier": "The Vatna glacier has retreated 2.4 kilometres since measurements began in 1890. Most of the "
    "loss happened after 1990, when the average summer temperature at the nearby weather station rose by 1.3 "
    "degrees. Meltwater now forms a lagoon at the glacier's snout, where icebergs calve into water up to 280 "
    "metres deep. Researchers drill stakes into the ice each spring and measure how much of them is exposed "
    "in autumn; the net loss in 2022 was 2.1 metres of water equivalent. The lagoon has become a popular tour "
    "destination, and boats now operate from May to October.",
    "compiler": "A compiler turns source code into a lower-level form in stages. The lexer splits text into "
    "tokens; the parser builds a syntax tree; semantic analysis resolves names and checks types; an "
    "intermediate representation makes optimisation independent of the source language; and the back end "
    "selects instructions, allocates registers and emits machine code. Optimisations such as constant "
    "folding, inlining and loop-invariant code motion work on the intermediate form. Register allocation is "
    "often modelled as graph colouring, where two variables that are live at the same time cannot share a "
    "register.",
    "beekeeping": "A honeybee colony has one queen, tens of thousands of female workers and, in summer, a "
    "few hundred male drones. Workers change jobs as they age: cleaning cells, feeding larvae, building comb, "
    "guarding the entrance and finally foraging. A strong colony can store 25 kilograms of surplus honey in a "
    "good season. Beekeepers inspect hives every seven to ten days in spring to look for queen cells, which "
    "signal that the colony is preparing to swarm. Varroa mites are the main threat to colonies today, and "
    "most beekeepers treat for them in late summer after the honey harvest.",
    "railway": "The Coastline Railway opened in 1911 and runs 184 kilometres between Harwick and Port Ellen. "
    "It crosses eleven viaducts, the longest of which, the Marram Viaduct, has 23 stone arches. Steam "
    "locomotives worked the line until 1967, when diesel railcars replaced them. Passenger numbers fell in "
    "the 1970s, and the line was nearly closed in 1982, but a campaign by local councils saved it. Today "
    "trains run every two hours, the journey takes three hours and ten minutes, and a heritage steam service "
    "runs on summer weekends.",
}
READING_INSTRUCTIONS = (
    "You answer questions about a passage for a reading-comprehension dataset. Use only facts stated in the "
    "passage. Answer in one or two short sentences. If the passage does not contain the answer, say 'not "
    "stated'. Quote numbers exactly as they appear, with their units."
)
QUESTIONS = [
    "When did this happen first?", "Summarise the passage in one sentence.", "What numbers are mentioned?",
    "What changed over time?", "Name one risk or problem mentioned.", "Who or what is the main subject?",
    "What would a visitor or practitioner need to know?", "Give a title for this passage.",
    "List two facts from the passage.", "What happens in summer?",
]
EVAL_HEADER = (
    "Answer each arithmetic word problem with a single number.\n\n"
    "Q: A shop sells pencils in boxes of 12. How many pencils are in 7 boxes?\nA: 84\n\n"
    "Q: Maria had 45 stamps and gave 17 to her brother. How many does she have left?\nA: 28\n\n"
    "Q: A train travels 60 kilometres per hour for 3 hours. How far does it go?\nA: 180\n\n"
    "Q: There are 5 shelves with 24 books each. 19 books are borrowed. How many books remain?\nA: 101\n\n"
)
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "June"]
THINGS = ["apples", "marbles", "tickets", "coins", "stickers", "bottles", "chairs", "letters"]


def requests(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(120):
        ticket = " ".join(
            [rng.choice(TICKET_PARTS["who"]), rng.choice(TICKET_PARTS["what"]), rng.choice(TICKET_PARTS["when"])]
        ) + ". " + rng.choice(TICKET_PARTS["extra"])
        messages = [{"role": "system", "content": SUPPORT_SYSTEM}]
        for text, label in FEW_SHOT:
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
        messages.append({"role": "user", "content": ticket.strip()})
        rows.append({"id": f"ticket-{i:03d}", "messages": messages, "max_tokens": 4, "temperature": 0})
    for name, doc in DOCUMENTS.items():
        for j, question in enumerate(QUESTIONS):
            prompt = f"{READING_INSTRUCTIONS}\n\nPassage: {doc}\n\nQuestion: {question}\nAnswer:"
            rows.append({"id": f"doc-{name}-q{j}", "prompt": prompt, "max_tokens": 48, "temperature": 0.7,
                         "top_p": 0.9, "seed": 1000 + j, "stop": ["\n\n"]})
    for k in range(60):
        a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 9)
        who, thing = rng.choice(NAMES), rng.choice(THINGS)
        problem = f"{who} has {a} {thing}, buys {c} packs of {b} more, and gives away {b}. How many {thing} now?"
        rows.append({"id": f"eval-{k:02d}", "prompt": EVAL_HEADER + f"Q: {problem}\nA:", "max_tokens": 8,
                     "temperature": 0, "stop": ["\n"]})
    rng.shuffle(rows)  # real files interleave jobs; the plan regroups them
    return rows


def to_openai(row: dict) -> dict:
    body = {k: v for k, v in row.items() if k != "id"}
    url = "/v1/chat/completions" if "messages" in row else "/v1/completions"
    return {"custom_id": row["id"], "method": "POST", "url": url, "body": {"model": "builtin-tiny", **body}}


def main(out_dir: Path) -> None:
    rows = requests(random.Random(0))
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "requests.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with (out_dir / "openai_batch.jsonl").open("w") as f:
        f.writelines(json.dumps(to_openai(r)) + "\n" for r in rows)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "sample_data"))
