"""Every wrong invocation of `ecgplat` ends in a short error, a non-zero exit and no traceback.

CASES below is the table of misuses, one row per wrong invocation: (command line, fragments
that the output must contain, exit status). Each new command adds its own rows here. A row's
command line may use these placeholders, all built once per module from the bundled data:

  {store}   a split feature store (copy of the synthetic cohort) with features/emb
  {cohort}  the synthetic CinC 2021 cohort the store was ingested from
  {shards}  train/valid shards of the store         {run}    a finished diagnosis run directory
  {pt}      a pretraining checkpoint                 {dx}     a diagnosis checkpoint
  {idx}     a FAISS gallery index (prefix)           {fs}     a fairseq-signals checkpoint
  {foreign_idx}  an index (prefix) not built from {store}
  {afile}   a plain text file (a path under it has a file as parent)
  {empty}   an empty directory                       {tmp}    a fresh directory for outputs
  {ptbxl_notroot} {ptbxl_garbage} {ptbxl_columns} {ptbxl_norows}: PTB-XL roots gone wrong
  {npz_<name>}  a predictions file from NPZ below
  {phantom} a copy of {store} whose commit.json counts 5 records more than its arrays hold
  {samples} the bundled sample corpora (data/samples)   {unsplit} a store never split
  {latin1}  a patients CSV in latin-1, not UTF-8
  {junk}    a folder of files of no ECG format (a .xml and a .dat)
  {nobucket} a bucket name that the loopback S3 server (the `s3` fixture, started only for
            the rows that use it) does not have
  {tbl_<name>} label tables gone wrong (`_label_tables`)   {forgot} {store} less one record

Errors raised by ecgplat itself are one `error: ...` line on stderr; usage errors found by the
argument parser (a bad choice or range) come in typer's usage panel. Either way the output
names the offending option, argument or file, and never carries a raw patient identifier.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.cli.apps import describe_error

RAW_ID = "SYN0"  # the synthetic cohort's raw patient ids are SYN00001...
REPO = Path(__file__).parents[1]
FAIRSEQ_CKPT = REPO / "tests" / "fixtures" / "fairseq_signals" / "w2v_cmsc_rlm_tiny.pt"
PRETRAINED = REPO / "tests" / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"
GPU = "cuda-present"  # marks a row that only is a misuse on a machine without CUDA

# fmt: off
CASES: list[tuple[str, list[str], int]] = [
    # --- top level -------------------------------------------------------------------------
    ("bogus", ["No such command", "bogus"], 2),
    ("evaluate bogus", ["No such command", "bogus"], 2),
    ("index bogus", ["No such command", "bogus"], 2),
    ("import bogus-format x y", ["No such command", "bogus-format"], 2),
    # --- synth -----------------------------------------------------------------------------
    ("synth", ["Missing argument", "OUT"], 2),
    ("synth {store}", ["not empty"], 2),
    ("synth {afile}/cohort", ["OUT", "is a file, not a directory"], 2),
    ("synth {tmp}/c --patients 0", ["--patients"], 2),
    ("synth {tmp}/c --seconds 0", ["--seconds"], 2),
    ("synth {tmp}/c --patients many", ["--patients", "valid integer"], 2),
    ("synth {tmp}/c --seed -1", ["--seed"], 2),
    # --- ingest ----------------------------------------------------------------------------
    ("ingest nope {cohort} --store {tmp}/s", ["unknown corpus", "nope"], 2),
    ("ingest cinc2021 {tmp}/missing --store {tmp}/s", ["missing", "does not exist"], 2),
    ("ingest cinc2021 {afile} --store {tmp}/s", ["afile", "not a directory"], 2),
    ("ingest cinc2021 {cohort}", ["Missing option", "--store"], 2),
    ("ingest cinc2021 {empty} --store {tmp}/s --workers 0 --no-progress",
     ["empty", "no cinc2021 records"], 2),
    ("ingest ptbxl {ptbxl_notroot} --store {tmp}/s --workers 0 --no-progress",
     ["ptbxl_database.csv", "not a PTB-XL root"], 2),
    ("ingest ptbxl {ptbxl_garbage} --store {tmp}/s --workers 0 --no-progress",
     ["ptbxl_database.csv", "cannot read"], 2),
    ("ingest ptbxl {ptbxl_columns} --store {tmp}/s --workers 0 --no-progress",
     ["ptbxl_database.csv", "missing columns", "filename_hr"], 2),
    ("ingest ptbxl {ptbxl_norows} --store {tmp}/s --workers 0 --no-progress",
     ["no ptbxl records"], 2),
    ("ingest cinc2021 {cohort} --store {afile}/s --workers 0", ["--store", "is a file"], 2),
    ("ingest cinc2021 {cohort} --store {afile} --workers 0", ["--store", "is a file"], 2),
    ("ingest cinc2021 {cohort} --store {shards} --workers 0 --no-progress",
     ["shards", "not an ecgplat store"], 2),
    ("ingest cinc2021 {cohort} --store {tmp}/s --workers -1", ["--workers"], 2),
    ("ingest cinc2021 {cohort} --store {tmp}/s --batch-size 0", ["--batch-size"], 2),
    ("ingest cinc2021 {cohort} --store {tmp}/s --limit 0", ["--limit"], 2),
    ("ingest cinc2021 {cohort} --store {tmp}/s --scheduler nohost --no-progress",
     ["nohost"], 2),
    ("ingest code15 {cohort} --store {tmp}/s --workers 0 --send-bytes --no-progress",
     ["--send-bytes", "code15"], 2),
    ("ingest ptbxl s3://b/raw/ --store {tmp}/s --workers 0 --no-progress",
     ["s3://b/raw/", "wfdb, cinc2021, ludb, cpsc2021", "not 'ptbxl'"], 2),
    ("ingest wfdb s3://{nobucket}/raw/ --store {tmp}/s --workers 0 --no-progress",
     ["s3://nobucket-", "bucket does not exist"], 2),
    ("ingest wfdb s3://b/raw/ --store {tmp}/s --workers 0 --send-bytes --no-progress",
     ["s3://b/raw/", "--send-bytes", "read a bucket themselves"], 2),
    ("ingest auto s3://b/raw/ --store {tmp}/s --no-progress",
     ["s3://b/raw/", "ingest auto reads a local folder"], 2),
    ("ingest ludb {samples}/cinc2021 --store {tmp}/s --workers 0 --no-progress",
     ["not a LUDB folder", "a CinC 2021 folder", "ingest cinc2021"], 2),
    ("ingest code15 {samples}/cinc2021 --store {tmp}/s --workers 0 --no-progress",
     ["not a CODE-15% folder", "a CinC 2021 folder"], 2),
    ("ingest cinc2021 {samples}/ludb --store {tmp}/s --workers 0 --no-progress",
     ["not a CinC 2021 folder", "a LUDB folder"], 2),
    ("ingest numpy {empty} --store {tmp}/s --fs 500 --leads I --patients {latin1}",
     ["latin1.csv", "not UTF-8"], 2),
    # --- ingest auto and --filter ----------------------------------------------------------
    ("ingest auto {empty} --store {tmp}/s --workers 0 --no-progress",
     ["empty", "no file of a known ECG format"], 2),
    ("ingest auto {junk} --store {tmp}/s --workers 0 --no-progress",
     ["junk", "no file of a known ECG format", "2 files of unrecognised format"], 2),
    ("ingest auto {samples}/wfdb_misc --store {tmp}/s --workers 0 --fs 500",
     ["--fs", "does not apply to the readers of the files found", "wfdb"], 2),
    ("ingest cinc2021 {cohort} --store {tmp}/s --filter lowpass=40",
     ["--filter", "lowpass=40", "bandpass=LO-HI or notch=HZ"], 2),
    ("ingest cinc2021 {cohort} --store {tmp}/s --filter notch=300", ["--filter", "0-250"], 2),
    ("ingest cinc2021 {cohort} --store {tmp}/s --filter bandpass=40-0.5",
     ["--filter", "low edge must be below"], 2),
    ("ingest auto {samples}/wfdb_misc --store {tmp}/s --filter notch=x",
     ["--filter", "not a number"], 2),
    ("ingest cinc2021 {cohort} --store {tmp}/s --filter ,", ["--filter", "empty spec"], 2),
    # --- watch -----------------------------------------------------------------------------
    ("watch {tmp}/missing --store {tmp}/s", ["missing", "does not exist"], 2),
    ("watch {afile} --store {tmp}/s", ["afile", "not a directory"], 2),
    ("watch {empty}", ["Missing option", "--store"], 2),
    ("watch {empty} --store {afile}", ["--store", "is a file"], 2),
    ("watch {empty} --store {shards}", ["shards", "not an ecgplat store"], 2),
    ("watch {empty} --store {tmp}/s --corpus ptbxl", ["--corpus ptbxl", "watch follows"], 2),
    ("watch {empty} --store {tmp}/s --embed e", ["--embed and --checkpoint"], 2),
    ("watch {empty} --store {tmp}/s --checkpoint {pt}", ["--embed and --checkpoint"], 2),
    ("watch {empty} --store {tmp}/s --index {tmp}/i", ["--index needs --embed"], 2),
    ("watch {empty} --store {tmp}/s --embed e --checkpoint {tmp}/no.pt",
     ["no.pt", "no such checkpoint"], 2),
    ("watch {empty} --store {tmp}/s --embed e --checkpoint {afile}", ["afile"], 2),
    ("watch {empty} --store {tmp}/s --embed e --checkpoint {pt} --index {empty}",
     ["--index", "is a directory"], 2),
    ("watch {empty} --store {tmp}/s --poll 0", ["--poll"], 2),
    ("watch {empty} --store {tmp}/s --settle -1", ["--settle"], 2),
    ("watch {empty} --store {tmp}/s --leads I,XX --max-seconds 1", ["--leads", "XX"], 2),
    ("watch {empty} --store {tmp}/s --embed a/b --checkpoint {pt} --max-seconds 1 --device cpu",
     ["bad feature set name", "a/b"], 2),
    ("watch {empty} --store {tmp}/s --embed e --checkpoint {pt} --index {foreign_idx} "
     "--max-seconds 1 --device cpu", ["--split all"], 2),
    # --- split -----------------------------------------------------------------------------
    ("split {tmp}/nostore", ["nostore", "no ecgplat store"], 2),
    ("split {afile}", ["afile", "no ecgplat store"], 2),
    ("split {store} --mode bogus", ["unknown split mode", "bogus"], 2),
    ("split {store} --ident-within bogus", ["--ident-within", "bogus"], 2),
    ("split {store} --ident-within valid --valid 0", ["ident_within", "valid"], 2),
    ("split {store} --valid 1.5", ["--valid"], 2),
    ("split {store} --valid 0.6 --test 0.6", ["valid", "test", "sum to < 1"], 2),
    ("split {store} --source nosuch", ["nosuch"], 2),
    ("split {phantom}", ["commit.json", "n_records=77", "records/record_key holds 72"], 2),
    ("split {store} --seed -1", ["--seed"], 2),
    # --- shards ----------------------------------------------------------------------------
    ("shards {tmp}/nostore --split train --out {tmp}/o", ["no ecgplat store"], 2),
    ("shards {store} --split nosuch --out {tmp}/o --no-progress", ["no records in split"], 2),
    ("shards {store} --split train --out {afile}/o", ["--out", "is a file, not a directory"], 2),
    ("shards {store} --split train --out {afile}", ["--out", "is a file, not a directory"], 2),
    ("shards {store} --split train --out {tmp}/o --max-size lots", ["bad size", "lots"], 2),
    ("shards {store} --split train --out {tmp}/o --max-count 0", ["--max-count"], 2),
    ("shards {store} --split train --out {tmp}/o --name a/b --no-progress",
     ["bad shard name", "a/b"], 2),
    ("shards {store} --out {tmp}/o", ["Missing option", "--split"], 2),
    ("shards {store} --split train --out s3://{nobucket}/p --no-progress",
     ["s3://", "bucket", "does not exist"], 2),
    ("shards {phantom} --split train --out {tmp}/o --no-progress",
     ["commit.json", "n_records=77"], 2),
    # --- info ------------------------------------------------------------------------------
    ("info {tmp}/nostore", ["nostore", "no ecgplat store"], 2),
    ("info {afile}", ["afile", "no ecgplat store"], 2),
    ("info {empty}", ["no ecgplat store"], 2),
    ("info", ["Missing argument", "STORE"], 2),
    ("info {phantom}", ["commit.json", "corrupt commit point", "n_records=77"], 2),
    # --- publish ---------------------------------------------------------------------------
    ("publish", ["Missing argument", "STORE"], 2),
    ("publish {store}", ["Missing argument", "URL"], 2),
    ("publish {tmp}/nostore s3://b/p", ["nostore", "no such store folder"], 2),
    ("publish {afile} s3://b/p", ["afile", "no ecgplat store"], 2),
    ("publish {empty} s3://b/p", ["no ecgplat store"], 2),
    ("publish {phantom} s3://b/p", ["commit.json", "n_records=77"], 2),
    ("publish {store} {tmp}/out", ["out", "not a URL"], 2),
    ("publish {store} s3://", ["s3://", "names no bucket"], 2),
    ("publish {store} nosuch://b/p", ["nosuch://b/p", "not a URL this machine can write to"], 2),
    # --- score -----------------------------------------------------------------------------
    ("score {tmp}/nope.npz", ["nope.npz", "no such predictions file"], 2),
    ("score {empty}", ["no such predictions file"], 2),
    ("score {npz_strings}", ["strings.npz", "labels", "numeric"], 2),
    ("score {npz_empty}", ["empty.npz", "no rows"], 2),
    ("score {npz_nothing}", ["nothing.npz", "missing array"], 2),
    ("score {afile}", ["afile", "not a readable .npz"], 2),
    ("score {npz_shapes}", ["shapes.npz", "(N, 26)"], 2),
    ("score {npz_nan}", ["nan.npz", "NaN"], 2),
    ("score {npz_twos}", ["twos.npz", "labels must be 0/1"], 2),
    ("score {npz_range}", ["range.npz", "[0, 1]"], 2),
    ("score {npz_nokeys}", ["nokeys.npz", "record_keys"], 2),
    ("score {npz_classes25}", ["classes25.npz", "26 classes"], 2),
    ("score {npz_keys}", ["keys.npz", "record_keys has 3 entries"], 2),
    ("score {npz_pickled}", ["pickled.npz", "not a readable .npz"], 2),
    ("score {npz_ok} --level bogus", ["--level", "bogus"], 2),
    ("score {npz_ok} --threshold 2", ["--threshold"], 2),
    # --- models ----------------------------------------------------------------------------
    ("models extra", ["unexpected extra argument", "extra"], 2),
    ("models --bogus", ["No such option", "--bogus"], 2),
    # --- import ----------------------------------------------------------------------------
    ("import fairseq-signals {tmp}/nope.pt {tmp}/o.pt", ["nope.pt", "no such file"], 2),
    ("import fairseq-signals {afile} {tmp}/o.pt", ["afile", "not a loadable torch checkpoint"], 2),
    ("import fairseq-signals {pt} {tmp}/o.pt", ["pretrain.pt", "hydra-era"], 2),
    ("import fairseq-signals {fs} {pt}", ["pretrain.pt", "already exists"], 2),
    ("import fairseq-signals {fs} {afile}/o.pt", ["OUT", "is a file, not a directory"], 2),
    ("import fairseq-signals {fs}", ["Missing argument", "OUT"], 2),
    # --- train -----------------------------------------------------------------------------
    ("train bogus --out {tmp}/r", ["unknown task", "bogus"], 2),
    ("train pretrain --shards {shards}", ["Missing option", "--out"], 2),
    ("train pretrain --out {tmp}/r", ["no shard directory", "--shards"], 2),
    ("train pretrain --shards {tmp}/noshards --out {tmp}/r", ["--shards", "noshards"], 2),
    ("train pretrain --shards {shards} --out {tmp}/r optim.bogus=1", ["optim.bogus"], 2),
    ("train pretrain --shards {shards} --out {tmp}/r optim.lr=fast", ["optim.lr", "fast"], 2),
    ("train pretrain --shards {shards} --out {tmp}/r noequals", ["noequals"], 2),
    ("train pretrain --shards {shards} --out {tmp}/r device=tpu", ["device", "tpu"], 2),
    ("train pretrain --shards {shards} --out {tmp}/r logging.wandb_mode=bogus",
     ["logging.wandb_mode", "bogus"], 2),
    ("train pretrain --shards {shards} --out {tmp}/r device=cuda", [GPU, "device=cuda"], 2),
    ("train pretrain --config nosuchpreset --shards {shards} --out {tmp}/r", ["nosuchpreset"], 2),
    ("train diagnosis --store {tmp}/nostore --shards {shards} --out {tmp}/r",
     ["--store", "nostore", "no ecgplat store"], 2),
    ("train identify --exclude-overlap {tmp}/nostore --shards {shards} --out {tmp}/r",
     ["--exclude-overlap", "nostore"], 2),
    ("train diagnosis --init {tmp}/nope.pt --shards {shards} --out {tmp}/r",
     ["--init", "nope.pt", "no such checkpoint"], 2),
    ("train pretrain --shards {shards} --out {afile}/r",
     ["--out", "is a file, not a directory"], 2),
    ("train pretrain --shards {shards} --out {afile}", ["--out", "is a file, not a directory"], 2),
    ("train pretrain --out {tmp}/r --resume", ["no checkpoint_last.pt", "resume"], 2),
    ("train diagnosis --shards {shards} --out {run}", ["already holds a training run"], 2),
    ("train diagnosis --store {unsplit} --shards {shards} --out {tmp}/r",
     ["unsplit", "never split", "ecgplat split"], 2),
    ("train diagnosis --out {run} --resume --leads 6", ["--leads cannot change"], 2),
    ("train pretrain --out {run} --resume", ["'diagnosis' run"], 2),
    ("train diagnosis --shards {shards} --out {tmp}/r --init {afile}",
     ["afile", "not a loadable torch checkpoint", "weights-only unpickler"], 2),
    ("train pretrain --shards {shards} --out {tmp}/r data.train_split=nosuch",
     ["no split 'nosuch'"], 2),
    # --- evaluate diagnosis ----------------------------------------------------------------
    ("evaluate diagnosis --checkpoint {tmp}/nope.pt --store {store}", ["nope.pt"], 2),
    ("evaluate diagnosis --checkpoint {pt} --store {store}", ["not a diagnosis model"], 2),
    ("evaluate diagnosis --checkpoint {afile} --store {store}", ["afile"], 2),
    ("evaluate diagnosis --checkpoint {dx} --store {tmp}/nostore", ["nostore"], 2),
    ("evaluate diagnosis --checkpoint {dx} --store {store} --split nope",
     ["nope", "no records"], 2),
    ("evaluate diagnosis --checkpoint {dx} --store {store} --leads XX", ["--leads", "XX"], 2),
    ("evaluate diagnosis --checkpoint {dx} --store {store} --device bogus",
     ["--device", "bogus"], 2),
    ("evaluate diagnosis --checkpoint {dx} --store {store} --device cuda",
     [GPU, "--device", "cuda"], 2),
    ("evaluate diagnosis --checkpoint {dx} --store {store} --wandb-mode bogus",
     ["--wandb-mode", "bogus"], 2),
    ("evaluate diagnosis --checkpoint {dx} --store {store} --out {afile}/o",
     ["--out", "is a file, not a directory"], 2),
    ("evaluate diagnosis --checkpoint {dx} --store {store} --batch-size 0", ["--batch-size"], 2),
    ("evaluate diagnosis --checkpoint {dx}", ["Missing option", "--store"], 2),
    # --- export / explain (issue 22) ---------------------------------------------------------
    ("export --checkpoint {tmp}/none.pt --out {tmp}/m.onnx", ["none.pt", "no such checkpoint"], 2),
    ("export --checkpoint {dx} --out {tmp}/m.onnx --format bogus", ["--format", "bogus"], 2),
    ("export --checkpoint {dx} --out {afile}/m.onnx", ["--out", "is a file, not a directory"], 2),
    ("export --checkpoint {afile} --out {tmp}/m.ts --format torchscript",
     ["afile", "not a loadable torch checkpoint"], 2),
    ("export --checkpoint {dx}", ["Missing option", "--out"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x", ["give either a RECORD_FILE or --store"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x --store {store}", ["--store needs --record"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x --record {record}", ["--record needs --store"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x --store {store} --record cinc2021/nosuch --class AF",
     ["--record", "nosuch", "no such record"], 2),
    ("explain --checkpoint {pt} --out {tmp}/x --store {store} --record {record} --class AF",
     ["'pretrain' checkpoint", "no task head"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x --store {store} --record {record} --class XYZ",
     ["--class XYZ", "not a class"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x --store {store} --record {record}",
     ["--class NAME or --output K"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x --store {store} --record {record} --output 26",
     ["--output 26", "outputs 0..25"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x --store {store} --record {record} --class AF "
     "--segment 9", ["--segment 9"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x {tmp}/nope.hea --class AF", ["nope", ".hea"], 2),
    ("explain --checkpoint {dx} --out {afile}/x --store {store} --record {record} --class AF",
     ["--out", "is a file, not a directory"], 2),
    ("explain --checkpoint {dx} --out {tmp}/x --store {store} --record {record} --class AF "
     "--baseline bogus", ["--baseline", "bogus"], 2),
    # --- predict ---------------------------------------------------------------------------
    ("predict --checkpoint {tmp}/nope.pt --out {tmp}/p.csv {cohort}",
     ["nope.pt", "no such checkpoint"], 2),
    ("predict --checkpoint {afile} --out {tmp}/p.csv {cohort}",
     ["afile", "not a loadable torch checkpoint"], 2),
    ("predict --checkpoint {pt} --out {tmp}/p.csv {cohort}", ["pretrain.pt", "no task head"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.txt {cohort}",
     ["--out", "p.txt", "unknown predictions file extension", ".csv, .parquet, .json"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv", ["no INPUT", "--store S --split X"], 2),
    ("predict --out {tmp}/p.csv {cohort}", ["Missing option", "--checkpoint"], 2),
    ("predict --checkpoint {dx} {cohort}", ["Missing option", "--out"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {tmp}/missing",
     ["INPUT", "missing", "no such file or folder"], 2),
    ("predict --checkpoint {dx} --out {afile}/p.csv {cohort}",
     ["--out", "is a file, not a directory"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv --store {store}", ["--store needs --split"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv --split test", ["--split needs --store"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv --store {store} --split test {cohort}",
     ["INPUT", "--store", "not both"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv --store {store} --split nope --no-progress",
     ["nope", "no records"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv --store {tmp}/nostore --split test",
     ["nostore", "no ecgplat store"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv --store {store} --split test --fs 500",
     ["--fs", "apply to INPUT files"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {cohort} --leads XX", ["--leads", "XX"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {cohort} --batch-size 0", ["--batch-size"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {cohort} --fs 500",
     ["--fs", "does not apply to the readers of the files found", "cinc2021"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {cohort} --filter lowpass=40",
     ["--filter", "lowpass=40"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {cohort} --precision fp16",
     ["--precision", "fp16"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {cohort} --device cuda",
     [GPU, "--device", "cuda"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {empty}",
     ["INPUT", "empty", "no files found"], 2),
    ("predict --checkpoint {dx} --out {tmp}/p.csv {junk} --no-progress",
     ["none of the 2 records could be predicted", "unrecognised format", "p.csv"], 2),
    # --- evaluate identify -----------------------------------------------------------------
    ("evaluate identify --store {tmp}/nostore --features emb", ["nostore"], 2),
    ("evaluate identify --store {store} --features zzz", ["no feature set 'zzz'"], 2),
    ("evaluate identify --store {store} --features emb --plot {afile}/cmc.png",
     ["--plot", "is a file, not a directory"], 2),
    ("evaluate identify --store {store} --features emb --plot {empty}",
     ["--plot", "is a directory"], 2),
    ("evaluate identify --store {store} --features emb --leads XX", ["XX"], 2),
    ("evaluate identify --store {store} --features emb --seed -1", ["--seed"], 2),
    ("evaluate identify --store {store} --features emb --max-probes -1",
     ["--max-probes must be >= 0", "-1"], 2),
    ("evaluate identify --store {store} --features emb --wandb-mode offline",
     ["--wandb-mode offline needs --out"], 2),
    ("evaluate identify --store {store} --features emb --wandb-mode offline --out {afile}",
     ["--out", "is a file, not a directory"], 2),
    ("evaluate task --checkpoint {dx} --store {store} --wandb-mode bogus", ["--wandb-mode"], 2),
    # --- forget ----------------------------------------------------------------------------
    ("forget {tmp}/nostore --record x", ["nostore", "no ecgplat store"], 2),
    ("forget {store}", ["--record", "--patient", "no forget is pending"], 2),
    ("forget {store} --record {record} --patient p-0123456789abcdef",
     ["exactly one of --record", "--patient"], 2),
    ("forget {store} --record cinc2021/nosuch", ["no record with the --record key",
     "nothing was changed"], 2),
    ("forget {store} --patient SYN00001", ["--patient", "not a patient pseudonym"], 2),
    ("forget {store} --patient p-0123456789abcdef", ["no records of the --patient"], 2),
    ("forget {store} --record {record} --index {tmp}/nope.faiss", ["nope.faiss", "not found"], 2),
    ("forget {store} --record {record} --index {afile}", ["afile.faiss", "not found"], 2),
    ("forget {store} --record {record} --index {foreign_idx}.faiss",
     ["not built from", "store"], 2),
    # --- embed -----------------------------------------------------------------------------
    ("embed --checkpoint {tmp}/nope.pt --store {store} --name e2",
     ["nope.pt", "no such checkpoint"], 2),
    ("embed --checkpoint {afile} --store {store} --name e2", ["afile", "not a loadable"], 2),
    ("embed --checkpoint {pt} --store {tmp}/nostore --name e2", ["nostore", "no ecgplat store"], 2),
    ("embed --checkpoint {pt} --store {store} --name e2 --device cuda",
     [GPU, "--device", "cuda"], 2),
    ("embed --checkpoint {pt} --store {store} --name e2 --device tpu", ["--device", "tpu"], 2),
    ("embed --checkpoint {pt} --store {store} --name e2 --leads XX", ["XX"], 2),
    ("embed --checkpoint {pt} --store {store} --name a/b", ["bad feature set name", "a/b"], 2),
    ("embed --checkpoint {pt} --store {store} --name e2 --batch-size 0", ["--batch-size"], 2),
    ("embed --checkpoint {dx} --store {store} --name emb", ["emb", "--overwrite"], 2),
    ("embed --checkpoint {pt} --store s3://nobucket/store --name e2 --device cpu",
     ["s3://nobucket/store", "read-only", "--features-out"], 2),
    ("embed --checkpoint {pt} --store {store} --name e2 --features-out {afile}",
     ["--features-out", "is a file, not a directory"], 2),
    ("embed --checkpoint {pt} --store {store}", ["Missing option", "--name"], 2),
    # --- index build -----------------------------------------------------------------------
    ("index build --store {tmp}/nostore --features emb --out {tmp}/i", ["nostore"], 2),
    ("index build --store {store} --features zzz --out {tmp}/i", ["zzz"], 2),
    ("index build --store {store} --features emb --out {tmp}/i --kind bogus",
     ["--kind", "bogus"], 2),
    ("index build --store {store} --features emb --out {tmp}/i --level bogus",
     ["--level", "bogus"], 2),
    ("index build --store {store} --features emb --out {tmp}/i --split bogus",
     ["--split", "bogus"], 2),
    ("index build --store {store} --features emb --out {afile}/i",
     ["--out", "is a file, not a directory"], 2),
    ("index build --store {store} --features emb --out {empty}", ["--out", "is a directory"], 2),
    # --- index update ----------------------------------------------------------------------
    ("index update --index {tmp}/nope.faiss --store {store} --features emb", ["nope.faiss"], 2),
    ("index update --index {afile} --store {store} --features emb", ["afile"], 2),
    ("index update --index {idx}.faiss --store {tmp}/nostore --features emb", ["nostore"], 2),
    ("index update --index {idx}.faiss --store {store} --features zzz", ["zzz"], 2),
    ("index update --index {idx}.faiss --store {store}", ["Missing option", "--features"], 2),
    ("index update --index {idx}.faiss --store {store} --features emb --compact-at -1",
     ["--compact-at"], 2),
    # --- index compact ---------------------------------------------------------------------
    ("index compact --index {tmp}/nope.faiss", ["nope.faiss", "not found"], 2),
    ("index compact --index {afile}", ["afile", "not found"], 2),
    ("index compact", ["Missing option", "--index"], 2),
    # --- query -----------------------------------------------------------------------------
    ("query --index {tmp}/nope.faiss --record x", ["nope.faiss"], 2),
    ("query --index {idx}.faiss", ["exactly one of --record", "--file"], 2),
    ("query --index {idx}.faiss --record a --file b.hea", ["exactly one of --record"], 2),
    ("query --index {idx}.faiss --record cinc2021/nosuch", ["no record", "nosuch"], 2),
    ("query --index {idx}.faiss --file {afile}", ["afile", ".hea"], 2),
    ("query --index {idx}.faiss --file {tmp}/nope.hea", ["nope.hea", ".hea"], 2),
    ("query --index {idx}.faiss --record {record} --plot {afile}/q.png",
     ["--plot", "is a file, not a directory"], 2),
    ("query --index {idx}.faiss --record {record} --k 0", ["--k"], 2),
    # --- serve (each refused before anything listens) ----------------------------------------
    ("serve --store {tmp}/nostore --index {idx}.faiss", ["--store", "no ecgplat store"], 2),
    ("serve --store {store}", ["give --index", "--checkpoint"], 2),
    ("serve --store {store} --index {tmp}/nope.faiss", ["--index", "nope.faiss", "no such"], 2),
    ("serve --store {store} --index {idx}.faiss --host 0.0.0.0",
     ["--host 0.0.0.0", "needs --tokens"], 2),
    ("serve --store {store} --index {idx}.faiss --tokens {afile}", ["afile", "chmod 600"], 2),
    ("serve --store {store} --index {foreign_idx}.faiss",
     ["foreign.faiss", "does not name its store"], 2),
    ("serve --store {unsplit} --index {idx}.faiss", ["built from another store"], 2),
    ("serve --store {store} --index {idx}.faiss --port 0", ["--port"], 2),
    # --- labels add / list (issue 19: bad label tables, one row each) -----------------------
    ("labels add {store} --name t --table {tbl_unmatched} --key id --target y",
     ["unmatched.csv", "2 of 12 key(s) match no record", "data rows 11, 12"], 2),
    ("labels add {store} --name t --table {tbl_dup} --key id --target y",
     ["dup.csv", "1 duplicate key(s)", "data row 6"], 2),
    ("labels add {store} --name t --table {tbl_nan} --key id --target y",
     ["nan.csv", "missing or NaN target", "data row 10"], 2),
    ("labels add {store} --name t --table {tbl_mixed} --key id --target y",
     ["mixed.csv", "mixes numbers and text", "data row 3"], 2),
    ("labels add {store} --name t --table {tbl_single} --key id --target y --kind multiclass",
     ["single.csv", "class 'b' has a single member"], 2),
    ("labels add {forgot} --name t --table {tbl_forgotten} --key k --target y",
     ["forgotten.csv", "1 key(s) name records withdrawn by `ecgplat forget`", "data row 1"], 2),
    ("labels add {store} --name t --table {tbl_nan} --key nosuch --target y",
     ["nan.csv", "no column 'nosuch'"], 2),
    ("labels add {store} --name t --table {afile} --key id --target y", ["afile", ".csv"], 2),
    ("labels add {store} --name t --table {tmp}/no.csv --key id --target y",
     ["no.csv", "no such table file"], 2),
    ("labels add {store} --name t", ["exactly one source"], 2),
    ("labels add {store} --name t --field age --vocabulary cinc26", ["exactly one source"], 2),
    ("labels add {store} --name diagnosis --field age", ["diagnosis", "built in"], 2),
    ("labels add {store} --name ../t --field age", ["task name"], 2),
    ("labels add {store} --name t --field height", ["--field", "height"], 2),
    ("labels add {store} --name t --vocabulary ptbxl-superclass", ["no PTB-XL records"], 2),
    ("labels add {store} --name t --field age --kind binary",
     ["--kind binary", "makes a regression task"], 2),
    ("labels add {tmp}/nostore --name t --field age", ["nostore", "no ecgplat store"], 2),
    ("labels list {tmp}/nostore", ["nostore", "no ecgplat store"], 2),
    ("labels list {afile}", ["afile", "no ecgplat store"], 2),
    # --- evaluate task, probe, train finetune -------------------------------------------------
    ("evaluate task --checkpoint {pt} --store {store}", ["pretrain", "not a diagnosis model"], 2),
    ("evaluate task --checkpoint {dx} --store {store} --labels nosuch", ["no task 'nosuch'"], 2),
    ("evaluate task --checkpoint {tmp}/none.pt --store {store}",
     ["none.pt", "no such checkpoint"], 2),
    ("evaluate task --checkpoint {dx} --store {tmp}/nostore", ["nostore", "no ecgplat store"], 2),
    ("evaluate task --checkpoint {dx} --store {store} --bootstrap -1", ["--bootstrap"], 2),
    ("probe --store {store} --features zzz --labels diagnosis", ["zzz"], 2),
    ("probe --store {store} --features emb --labels nosuch", ["no task 'nosuch'"], 2),
    ("probe --store {store} --features emb --labels diagnosis --threshold-rule bogus",
     ["--threshold-rule", "bogus"], 2),
    ("train finetune --labels nosuch --shards {shards} --store {store} --out {tmp}/r",
     ["--labels", "nosuch", "no such task"], 2),
    ("train finetune --labels sex --shards {shards} --out {tmp}/r", ["--labels", "--store"], 2),
    ("train diagnosis --labels sex --shards {shards} --store {store} --out {tmp}/r",
     ["train finetune"], 2),
]
# fmt: on

NPZ = {  # name -> arrays of a predictions file that `score` must refuse (or accept: "ok")
    "ok": dict(
        labels=np.eye(4, 26, dtype=bool),
        probabilities=np.full((4, 26), 0.25),
        record_keys=np.array(["a", "b", "c", "d"]),
    ),
    "strings": dict(
        labels=np.full((4, 26), "x"),
        probabilities=np.full((4, 26), 0.25),
        record_keys=np.array(["a", "b", "c", "d"]),
    ),
    "empty": dict(
        labels=np.zeros((0, 26), bool),
        probabilities=np.zeros((0, 26)),
        record_keys=np.zeros(0, str),
    ),
    "nothing": {},
    "shapes": dict(labels=np.zeros((4, 26), bool), probabilities=np.zeros((3, 26))),
    "nan": dict(labels=np.zeros((2, 26), bool), probabilities=np.full((2, 26), np.nan)),
    "twos": dict(labels=np.full((2, 26), 2), probabilities=np.zeros((2, 26))),
    "range": dict(labels=np.zeros((2, 26), bool), probabilities=np.full((2, 26), 3.0)),
    "nokeys": dict(labels=np.zeros((2, 26), bool), probabilities=np.zeros((2, 26))),
    "classes25": dict(
        labels=np.zeros((2, 25), bool),
        probabilities=np.zeros((2, 25)),
        record_keys=np.array(["a", "b"]),
    ),
    "keys": dict(
        labels=np.zeros((2, 26), bool),
        probabilities=np.zeros((2, 26)),
        record_keys=np.array(["a", "b", "c"]),
    ),
    "pickled": dict(labels=np.array([{"x": 1}], dtype=object), probabilities=np.zeros((1, 26))),
}


def _label_tables(base: Path, store: Path) -> dict[str, str]:
    """{tbl_<name>}: label tables that `labels add` must refuse, keyed by the store's record
    ids; {forgot}: a copy of the store with its first record forgotten (tbl_forgotten names
    it by record key)."""
    import pandas as pd

    from ecgplat.store import open_store
    from ecgplat.store.forget import forget

    ids = open_store(store).records["record_id"].tolist()
    y = [str(v) for v in range(10)]
    frames = {
        "unmatched": {"id": ids[:10] + ["NOPE1", "NOPE2"], "y": y + ["1", "2"]},
        "dup": {"id": ids[:5] + ids[:1], "y": y[:6]},
        "nan": {"id": ids[:10], "y": y[:9] + ["NaN"]},
        "mixed": {"id": ids[:10], "y": y[:2] + ["three"] + y[3:]},
        "single": {"id": ids[:10], "y": ["a"] * 9 + ["b"]},
        "forgotten": {"k": [f"cinc2021/{i}" for i in ids[:10]], "y": y},
    }
    out = {}
    for name, frame in frames.items():
        pd.DataFrame(frame).to_csv(base / f"{name}.csv", index=False)
        out[f"tbl_{name}"] = str(base / f"{name}.csv")
    shutil.copytree(store, base / "forgot")
    forget(base / "forgot", record=f"cinc2021/{ids[0]}")
    return {**out, "forgot": str(base / "forgot")}


runner = CliRunner()


@pytest.fixture(scope="module")
def world(synth_cohort, synth_store, synth_shards, tmp_path_factory) -> dict[str, str]:
    """The placeholders of CASES (module docstring), built once."""
    import torch

    from retrieval.embed import embed_store
    from retrieval.index import index_from_features
    from training.models.checkpoint_file import load_encoder, save_checkpoint
    from training.models.classifier import DiagnosisModel

    base = tmp_path_factory.mktemp("misuse")
    store = base / "store"
    shutil.copytree(synth_store, store)  # the session store stays read-only
    pt = base / "pretrain.pt"
    shutil.copy(PRETRAINED, pt)
    embed_store(store, pt, "emb", progress=False)
    index_from_features(store, "emb", split="gallery").save(base / "gallery")
    torch.manual_seed(0)
    model = DiagnosisModel(load_encoder(pt))
    run = base / "run"
    dx = save_checkpoint(
        run / "checkpoint_last.pt",
        kind="diagnosis",
        encoder_config=model.encoder.cfg,
        model=model.state_dict(),
    )
    (run / "config.yaml").write_text("task: diagnosis\n")
    afile, empty = base / "afile", base / "empty"
    afile.write_text("not what you think\n")
    empty.mkdir()
    roots = {}
    for name, csv in (
        ("notroot", None),
        ("garbage", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
        ("columns", b"ecg_id,age\n1,50\n"),
        ("norows", b"ecg_id,patient_id,filename_hr,scp_codes\n"),
    ):
        root = base / f"ptbxl_{name}"
        root.mkdir()
        if csv is not None:
            (root / "ptbxl_database.csv").write_bytes(csv)
        roots[f"ptbxl_{name}"] = str(root)
    npz = {}
    for name, arrays in NPZ.items():
        np.savez(base / f"{name}.npz", **arrays)
        npz[f"npz_{name}"] = str(base / f"{name}.npz")
    from ecgplat.store import open_store
    from retrieval.index import build_index

    build_index(np.eye(2, 4, dtype=np.float32), ["a", "b"]).save(base / "foreign")
    phantom = base / "phantom"  # a copy taken mid-write: commit.json ahead of the arrays
    shutil.copytree(synth_store, phantom)
    state = json.loads((phantom / "commit.json").read_text())
    (phantom / "commit.json").write_text(json.dumps({**state, "n_records": 77}))
    gallery = open_store(store).select(ident_split="gallery")
    from ingestion.pipeline import ingest

    samples = REPO / "data" / "samples"
    ingest("cinc2021", samples / "cinc2021", base / "unsplit", workers=0, progress=False)
    (base / "latin1.csv").write_bytes("record_id,patient_id\nrec,Müller\n".encode("latin-1"))
    (base / "junk").mkdir()
    (base / "junk" / "notes.xml").write_text("not an ECG\n")
    (base / "junk" / "scan.dat").write_bytes(bytes(range(256)))
    record = str(open_store(store).records["record_key"].iloc[int(gallery[0])])
    return {
        "store": str(store),
        "cohort": str(synth_cohort),
        "shards": str(synth_shards),
        "pt": str(pt),
        "dx": str(dx),
        "run": str(run),
        "idx": str(base / "gallery"),
        "foreign_idx": str(base / "foreign"),
        "samples": str(REPO / "data" / "samples"),
        "unsplit": str(base / "unsplit"),
        "latin1": str(base / "latin1.csv"),
        "junk": str(base / "junk"),
        "fs": str(FAIRSEQ_CKPT),
        "afile": str(afile),
        "empty": str(empty),
        "record": record,
        "phantom": str(phantom),
        **roots,
        **npz,
        **_label_tables(base, store),
    }


def _flat(text: str) -> str:
    """Output with typer's panel borders removed and whitespace collapsed (panels wrap)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("line, fragments, code", CASES, ids=[c[0] for c in CASES])
def test_misuse(line, fragments, code, world, tmp_path, request):
    if GPU in fragments:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is present: --device cuda is not a misuse here")
        fragments = [f for f in fragments if f != GPU]
    extra = {}
    if "{nobucket}" in line:  # S3 rows: the loopback server, whose AWS variables then apply
        request.getfixturevalue("s3")
        extra["nobucket"] = f"nobucket-{os.getpid()}"
    args = [a.format(tmp=tmp_path, **world, **extra) for a in line.split()]
    r = runner.invoke(app, args, env={"ECGPLAT_DEBUG": None, "COLUMNS": "100"})
    out = r.stdout + r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in out, out
    assert r.exit_code == code, out
    flat = _flat(out)
    for fragment in fragments:
        assert fragment.lower() in flat.lower(), f"{fragment!r} not in {out!r}"
    if r.stderr.startswith("error: "):  # ecgplat's own message: exactly one line
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stdout == "" or "Usage" not in r.stdout
    assert RAW_ID not in out


def test_table_covers_every_command():
    """Each command listed by `ecgplat --help` (and each sub-command) has misuse rows."""
    import typer.main

    group = typer.main.get_command(app)
    names = []
    for name, cmd in group.commands.items():
        subs = getattr(cmd, "commands", None)
        names += [f"{name} {sub}" for sub in subs] if subs else [name]
    lines = [c[0] for c in CASES]
    for name in names:
        rows = [line for line in lines if line == name or line.startswith(name + " ")]
        assert len(rows) >= 2, f"no misuse rows for `ecgplat {name}`"
    assert len(CASES) >= 60


def test_split_misuse_leaves_the_assignment_alone(world):
    """A refused split does not touch the store's current split (the old bug: exit 0 and
    every gallery/probe assignment wiped)."""
    from ecgplat.store import open_store

    before = open_store(world["store"]).records[["split", "ident_split"]].copy()
    for args in (["--ident-within", "bogus"], ["--ident-within", "valid", "--valid", "0"]):
        r = runner.invoke(app, ["split", world["store"], *args])
        assert r.exit_code == 2
    after = open_store(world["store"]).records[["split", "ident_split"]]
    assert after.equals(before) and (after["ident_split"] == "gallery").any()


def test_split_ident_within_implies_ident(world, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    r = runner.invoke(
        app, ["split", str(store), "--valid", "0.2", "--test", "0.2", "--ident-within", "test"]
    )
    assert r.exit_code == 0, r.output
    from ecgplat.store import open_store

    frame = open_store(store).records
    sides = frame.loc[frame["ident_split"] != "", "split"]
    assert len(sides) > 0 and set(sides) == {"test"}


def test_train_refuses_missing_store_before_writing(world, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "train",
            "diagnosis",
            "--store",
            str(tmp_path / "nostore"),
            "--shards",
            world["shards"],
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 2 and "no ecgplat store" in r.stderr
    assert not out.exists()


def test_outputs_create_their_missing_folders(world, tmp_path):
    """The rule of every --out and --plot: missing folders are created (the old bug: `index
    build` failed on its lock file's folder); a refused command creates none."""
    out = tmp_path / "new" / "dir" / "X"
    args = ["index", "build", "--store", world["store"], "--features", "emb", "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert out.with_name("X.faiss").is_file()
    plot = tmp_path / "plots" / "sub" / "q.png"
    query = ["query", "--index", world["idx"] + ".faiss", "--plot", str(plot), "--record"]
    r = runner.invoke(app, [*query, "cinc2021/nosuch"])
    assert r.exit_code == 2 and not (tmp_path / "plots").exists()
    r = runner.invoke(app, [*query, world["record"]])
    assert r.exit_code == 0 and plot.stat().st_size > 1000, r.output


def test_checkpoint_errors_never_advise_weights_only_false(world, tmp_path):
    """PyTorch's "re-run with weights_only=False" would run code from the file: the reason is
    kept, the advice is not."""
    for args in (
        ["embed", "--checkpoint", world["afile"], "--store", world["store"], "--name", "e3"],
        ["import", "fairseq-signals", world["afile"], str(tmp_path / "o.pt")],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "weights-only unpickler: Unsupported" in r.stderr, r.output
        assert "weights_only" not in r.output and "trusted source" not in r.output


def test_score_accepts_the_valid_file(world):
    r = runner.invoke(app, ["score", world["npz_ok"], "--json"])
    assert r.exit_code == 0, r.output
    assert '"challenge_score"' in r.stdout


# ---- the central handler: expected errors vs bugs ----------------------------------------


def _caught(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the exception is the test subject
        return exc
    raise AssertionError("no exception")


def test_describe_error_sorts_expected_errors_from_bugs(tmp_path):
    from training.distributed import pick_device
    from training.run_config import ConfigError, load_config

    msg, expected = describe_error(_caught(load_config, "nosuchpreset", []))
    assert expected and "nosuchpreset" in msg and "\n" not in msg
    assert isinstance(_caught(load_config, "nosuchpreset", []), ConfigError)
    msg, expected = describe_error(_caught(open, tmp_path / "missing.txt"))
    assert expected and msg == f"{tmp_path / 'missing.txt'}: No such file or directory"
    msg, expected = describe_error(_caught(pick_device, "tpu"))  # a `raise` in ecgplat's code
    assert expected and msg == "unknown device 'tpu'"
    msg, expected = describe_error(_caught(np.zeros(3).reshape, 2, 2))  # numpy's own ValueError
    assert not expected and "ValueError" in msg and "ECGPLAT_DEBUG=1" in msg
    assert "reshape" not in msg and "size 3" not in msg


def test_bug_message_hides_data_values():
    """A third-party conversion error quotes the bad value (here a raw patient id): the handler
    reports a bug, without the text."""
    import pandas as pd

    exc = _caught(pd.to_numeric, pd.Series(["HOSP-4242-ZZ"]))
    assert "HOSP-4242-ZZ" in str(exc)
    msg, expected = describe_error(exc)
    assert not expected and "HOSP" not in msg and "4242" not in msg and "\n" not in msg


def test_debug_env_and_console_script(world, tmp_path):
    """Real processes: the console script prints one line and exits 2; with ECGPLAT_DEBUG=1
    the same error propagates with its traceback."""
    exe = Path(sys.executable).with_name("ecgplat")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ECGPLAT_DEBUG", None)
    cmd = [
        str(exe),
        "ingest",
        "ptbxl",
        world["ptbxl_notroot"],
        "--store",
        str(tmp_path / "s"),
        "--workers",
        "0",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "not a PTB-XL root" in proc.stderr
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env=dict(env, ECGPLAT_DEBUG="1")
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "RecordError" in proc.stderr
    proc = subprocess.run(
        [str(exe), "score", world["npz_strings"]],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2 and "labels must be numeric" in proc.stderr


def test_a_bug_exits_1_with_the_debug_hint():
    """A command that hits a third-party error (a bug, not a misuse) under the same group class:
    exit 1, one line without the exception text; ECGPLAT_DEBUG=1 lets it propagate."""
    import typer

    from ecgplat.cli.apps import GuardedGroup

    buggy = typer.Typer(cls=GuardedGroup, add_completion=False)

    @buggy.command()
    def reshape(n: int = 3) -> None:
        np.zeros(n).reshape(2, 2)

    @buggy.command()
    def other() -> None:  # a second command keeps `reshape` a sub-command
        pass

    r = runner.invoke(buggy, ["reshape"], env={"ECGPLAT_DEBUG": None})
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert r.stderr.startswith("error: unexpected ValueError") and "ECGPLAT_DEBUG=1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "size 3" not in r.stderr
    assert "apps.py" not in r.stderr  # the handler is not where the bug is
    r = runner.invoke(buggy, ["reshape"], env={"ECGPLAT_DEBUG": "1"})
    assert isinstance(r.exception, ValueError) and "size 3" in str(r.exception)
    r = runner.invoke(buggy, ["reshape", "--n", "4"], env={"ECGPLAT_DEBUG": None})
    assert r.exit_code == 0
