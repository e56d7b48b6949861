"""Benchmark of ``text-scrub`` against Microsoft Presidio on the same labelled synthetic texts.

Prints rows/s (median of ``--repeat``) and, against the corpus labels, the
precision and recall of each, plus how often the two agree, side by side:

* ``cape-pipelines``: the core applying a ``text-scrub`` policy (placeholders);
* ``presidio``: ``presidio-analyzer`` with its pattern recognizers for the same
  entity types (e-mail, credit card, IBAN, US SSN, IP, phone) on a blank spaCy
  pipeline, then ``presidio-anonymizer`` replacing each finding by
  ``<ENTITY>``. Presidio's usual NER model (``en_core_web_lg``) is not
  installable offline here and is not needed for these entity types: its
  recognizers for them are patterns plus checksums, as ours are;
* ``presidio-anonymizer``: the anonymizer alone, given our findings, which is
  the part that replaces text.

    pip install -e .[bench]      # presidio-analyzer, presidio-anonymizer
    python bench/text_scrub.py --rows 20000

The corpus comes from tests/core/scrub_corpus.py (texts with one entity and a
look-alike distractor each). Presidio's e-mail check uses ``tldextract``,
which would fetch the public suffix list at run time; it is pointed at its
bundled copy so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))

import scrub_corpus

from cape_pipelines.core import apply_table
from cape_pipelines.plan import build_plan
from cape_pipelines.transforms.text_scrub import TextScrub

PRESIDIO_TYPES = {
    "EMAIL_ADDRESS": "email",
    "CREDIT_CARD": "card",
    "IBAN_CODE": "iban",
    "US_SSN": "ssn",
    "PHONE_NUMBER": "phone",
}
Span = tuple[int, int, str]


def _presidio_entity(kind: str, text: str) -> str:
    if kind == "IP_ADDRESS":
        return "ipv6" if ":" in text else "ipv4"
    return PRESIDIO_TYPES.get(kind, kind.lower())


def presidio_engines():
    """(analyzer, anonymizer, OperatorConfig) or None when Presidio is not installed."""
    try:
        import spacy
        import tldextract
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
            UsSsnRecognizer,
        )
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig
    except ImportError:
        return None
    # The bundled public suffix list: no download at run time.
    tldextract.extract = tldextract.TLDExtract(suffix_list_urls=())

    class BlankEnglish(SpacyNlpEngine):
        """A spaCy tokenizer without a trained model (the pattern recognizers need no NER)."""

        def __init__(self) -> None:
            super().__init__(models=[{"lang_code": "en", "model_name": "blank"}])

        def load(self) -> None:
            self.nlp = {"en": spacy.blank("en")}

    nlp = BlankEnglish()
    nlp.load()
    registry = RecognizerRegistry()
    for recognizer in (
        EmailRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
        UsSsnRecognizer(),
        IpRecognizer(),
        PhoneRecognizer(),
    ):
        registry.add_recognizer(recognizer)
    analyzer = AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=["en"])
    return analyzer, AnonymizerEngine(), OperatorConfig


def score(found: list[list[Span]], truth: list[list[Span]]) -> dict[str, tuple[float, float]]:
    """Per entity: (precision, recall) of ``found`` against ``truth``."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for f, t in zip(found, truth, strict=True):
        fs, ts = set(f), set(t)
        for s in fs:
            (tp if s in ts else fp)[s[2]] += 1
        for s in ts - fs:
            fn[s[2]] += 1
    out = {}
    for e in scrub_corpus.MAKERS:
        out[e] = (tp[e] / max(1, tp[e] + fp[e]), tp[e] / max(1, tp[e] + fn[e]))
    return out


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    corpus = scrub_corpus.generate(args.rows, seed=11)
    texts = [t for t, _ in corpus]
    truth = [s for _, s in corpus]
    table = pa.table({"note": pa.array(texts)})
    policy = {
        "label": "bench",
        "rules": [{"match": {"name": "note"}, "actions": [{"transform": {"type": "text-scrub"}}]}],
    }
    plan = build_plan(policy, table.schema)
    ours_s = timed(lambda: apply_table(plan, table), args.repeat)
    scrub = TextScrub()
    ours_found = [scrub.find(t) for t in texts]
    rows: list[tuple[str, float, dict[str, tuple[float, float]] | None]] = [
        ("cape-pipelines", args.rows / ours_s, score(ours_found, truth))
    ]

    engines = presidio_engines()
    agreement = None
    if engines is not None:
        analyzer, anonymizer, operator_config = engines
        from presidio_anonymizer.entities import RecognizerResult

        placeholder = {"DEFAULT": operator_config("replace", {})}

        def presidio_all() -> list:
            out = []
            for text in texts:
                results = analyzer.analyze(text, language="en")
                out.append(anonymizer.anonymize(text, results, placeholder).text)
            return out

        p_s = timed(presidio_all, args.repeat)
        p_found = []
        for text in texts:
            results = analyzer.analyze(text, language="en")
            # What the anonymizer would keep: overlapping findings resolved by score.
            spans = sorted(
                (r.start, r.end, _presidio_entity(r.entity_type, text[r.start : r.end]), r.score)
                for r in results
            )
            kept: list[Span] = []
            for start, end, entity, _ in sorted(spans, key=lambda s: (-s[3], s[0])):
                if all(end <= k[0] or start >= k[1] for k in kept):
                    kept.append((start, end, entity))
            p_found.append(sorted(kept))
        rows.append(("presidio", args.rows / p_s, score(p_found, truth)))
        same = sum(set(a) == set(b) for a, b in zip(ours_found, p_found, strict=True))
        agreement = same / len(texts)

        given = [
            [RecognizerResult(e.upper(), s, t, 1.0) for s, t, e in found] for found in ours_found
        ]

        def anonymizer_only() -> list:
            return [
                anonymizer.anonymize(text, results, placeholder).text
                for text, results in zip(texts, given, strict=True)
            ]

        a_s = timed(anonymizer_only, args.repeat)
        rows.append(("presidio-anonymizer", args.rows / a_s, None))

    print(f"# {args.rows:,} synthetic texts (tests/core/scrub_corpus.py), median of {args.repeat}")
    entities = list(scrub_corpus.MAKERS)
    print(f"{'implementation':22} {'rows/s':>10} {'vs ours':>8}  precision/recall per entity")
    print(f"{'':22} {'':>10} {'':>8}  " + " ".join(f"{e:>11}" for e in entities))
    base = rows[0][1]
    for name, rate, quality in rows:
        cells = (
            " ".join(f"{quality[e][0]:5.3f}/{quality[e][1]:5.3f}" for e in entities)
            if quality
            else "(given our findings: replacement only)"
        )
        print(f"{name:22} {rate:10,.0f} {base / rate:7.1f}x  {cells}")
    if engines is None:
        print("presidio: not installed (pip install -e .[bench]); not measured")
    else:
        print(f"texts where both find exactly the same spans and types: {agreement:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
