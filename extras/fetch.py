"""Fetch one of the paper's two federated FLAN data sets from the official release, at a pinned commit,
checking every file against the sha256 written here:

    python -m extras.fetch DIR              # data set 1; then: python train.py --data DIR ...
    python -m extras.fetch DIR --set 2      # data set 2

DIR receives 8/local_training_<i>.json (8 clients, one FLAN task each) and the test file
flan_test_200_selected_nstrict_1.jsonl (8 tasks x 200), the layout data.load_federated reads. Set 1:
coreference, entailment, linguistic acceptability, paraphrase, question classification, structure to
text, text formatting, word disambiguation. Set 2: hellaswag, qnli, arc_easy, paws_wiki, bool_q,
sentiment140, gigaword, word_segment (common sense, entailment, open-domain QA, paraphrase, reading
comprehension, sentiment, summarization, text formatting); its prompts are long. Nothing
is written unless every file arrives whole and matches: a failed or damaged download is one line on
stderr, exit code 2, and no DIR. A porter can skip this file.
"""
import argparse
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from hf import atomic_write

COMMIT = "cf638c11ecf931b2a3be841d3062912b855f3a8d"  # github.com/Lydia-yang/FedDPA
BASE_URL = f"https://raw.githubusercontent.com/Lydia-yang/FedDPA/{COMMIT}/"
SETS = {  # set -> its folder in the release, and {file: sha256} (computed from the commit's blobs)
    1: ("data/dataset1/", {
        "8/local_training_0.json": "38e550b0b9b346010d2642558916c5d0807ba0e765d6fe333b6e3e2464398090",
        "8/local_training_1.json": "84241186db1c80522af18278102434e3820918f014333be51d3acf684515f0d7",
        "8/local_training_2.json": "7335a428ee82d4b2147a9b5b71ea47515d5c8547e69e4412be73b3c64c53bcae",
        "8/local_training_3.json": "fc76202d614776a9bc6b5875a0dd81983f8f81a020d113930807ab288e5c3940",
        "8/local_training_4.json": "492884e9aa04a2536bdd96753b1dc895bb0cc8fe3cfa7feae7d9ecc05ed8df22",
        "8/local_training_5.json": "4c1c300412a437434ab8ef62a01b030c9cbd392c3fad4d420fe5ebf8b385b03d",
        "8/local_training_6.json": "3287eb663d3fb1b4eb0b55c4694faef4438fb7949ae430906e4556017b797f1e",
        "8/local_training_7.json": "935953f65868f4d263aca17fee68683376bb410403000ee24a260c42bdb51e44",
        "flan_test_200_selected_nstrict_1.jsonl": "bb1edaafe2eadd2720885aa64113d172f589623477a1ba242e7f6cdeebd9fb8c",
    }),
    2: ("data/dataset2/", {
        "8/local_training_0.json": "4e2d34c02a374c035b75dff2d24fa7ea0493369db7ffbe15938473575d3ba8e3",
        "8/local_training_1.json": "67055b0995740016a304db5393b433fe87c402f33ee4fccde4f70e24a8b25106",
        "8/local_training_2.json": "0e8bda822f93c46492fe3267715c607c4bf3bcffa53e6bdefaba979f6cbf843a",
        "8/local_training_3.json": "51e91ace4039363990ceef7d3fb54bab1779197d3d48935db72f9cf30fb610f5",
        "8/local_training_4.json": "5a2b9303906e0be4ae78b69ddcb2858fa8af3ad9887f114e00451a459d55b7e8",
        "8/local_training_5.json": "c9ce5c471a66d40f3863febc7a5237bff42edb7ea233c34860816f652930ea37",
        "8/local_training_6.json": "a4add4b14506aaca6277212ff31c448ebe938216ec900c99f87ead6b9e2f13ef",
        "8/local_training_7.json": "cf422b5623dac784ac1e3d69396a55472b00304c18e7fd524bee82463abce58d",
        "flan_test_200_selected_nstrict_1.jsonl": "84cd7d24d9c2ead486fec121f7b7c306c2fc14607456f2771aa93e82653e9303",
    }),
}


class FetchError(Exception):
    """A download that failed or does not match; the message is one line naming the URL."""


def download(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise FetchError(f"{url}: cannot download (HTTP {e.code})") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"{url}: cannot download ({str(reason).splitlines()[0] if str(reason) else type(e).__name__})") from None


def fetch(dest: str, base_url: str = BASE_URL, timeout: float = 60, which: int = 1) -> Path:
    """Download and check every file of data set `which`, then move them into dest (new, or an empty
    folder) in one rename."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FetchError(f"{dest}: exists and is not an empty folder; fetch into a new one")
    blobs = {}
    remote, sha256 = SETS[which]
    for name, want in sha256.items():
        url = base_url.rstrip("/") + "/" + remote + name
        body = download(url, timeout)
        got = hashlib.sha256(body).hexdigest()
        if got != want:
            raise FetchError(f"{url}: sha256 {got[:16]}... is not the pinned release's {want[:16]}...; nothing written")
        blobs[name] = body
    tmp = dest.parent / f".{dest.name}.tmp{os.getpid()}"
    try:
        for name, body in blobs.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(str(tmp / name), [body])
        os.replace(tmp, dest)  # onto a missing or empty folder: all the files appear at once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", help="a new folder for the data set")
    ap.add_argument("--set", type=int, choices=sorted(SETS), default=1, help="which of the paper's data sets (default 1)")
    ap.add_argument("--base-url", default=BASE_URL, help="where the release's files are served (default: GitHub, pinned)")
    args = ap.parse_args(argv)
    try:
        dest = fetch(args.dest, args.base_url, which=args.set)
    except (FetchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{dest}: FLAN data set {args.set}, {len(SETS[args.set][1]) - 1} client files and the test file, sha256 checked "
          f"(release {COMMIT[:7]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
