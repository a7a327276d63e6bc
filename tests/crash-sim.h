/* tests/crash-sim.h: a power-loss simulator for the qcow2 engine.
 *
 * A test runs a workload through the engine on the fake backend with data
 * recording on (aio_fake_record_data), and tells the simulator about every
 * guest request: when it was submitted and when its callback ran
 * (cs_submit/cs_ack).  Afterwards cs_check rebuilds images as they could be
 * after a power loss at many points of the run:
 *
 *   the image when the workload started
 *   + every write and punch that ran before the last fdatasync that ran
 *     before the crash point (in the order they ran), with the file size
 *     that fdatasync found (the engine also resizes the file with
 *     ftruncate, which the backend does not see)
 *   + any subset of the writes and punches that ran after that fdatasync
 *     and before the crash point (all, none, random subsets, and subsets
 *     torn at sector granularity), with the file size then or the one
 *     the fdatasync found
 *
 * and judges each one:
 *
 *   qemu-img check finds no corruption (exit status 0, or 3: leaks only);
 *   for lazy_refcounts images (left dirty) the engine's repair at a
 *   read-write open succeeds instead, and qemu-img check after its close;
 *
 *   read through the engine, every 512-byte sector holds something it may
 *   hold: the content of a write to it that was guaranteed durable at the
 *   crash point (acknowledged before a flush that completed, or a FUA
 *   write that completed) and that no later guaranteed write replaced, or
 *   of a write not yet guaranteed that was submitted before the crash and
 *   was not replaced by a guaranteed one, or the initial contents when no
 *   guaranteed write reached it.  Guest writes carry self-describing data
 *   (cs_fill) so that every sector says which write it came from.
 *
 * "Time" for the guest model is counted two ways: an event counter orders
 * submissions and callbacks, and the fake's completed-op counter
 * (aio_fake_completed) places them against the I/O: a crash point k means
 * that exactly the ops with completed_seq < k have run.
 */
#ifndef QNBD_CRASH_SIM_H
#define QNBD_CRASH_SIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct aio;
struct cs;

enum cs_kind {
  CS_WRITE,                     /* data from cs_fill */
  CS_ZERO,                      /* write-zeroes: the range reads as zeros */
  CS_DISCARD,                   /* whole clusters inside read as zeros (or
                                   as the initial contents, see below) */
};

struct cs_config {
  const char *name;             /* for messages */
  const char *path;             /* the image the workload writes */
  int fd;                       /* the engine's descriptor of that image */
  uint64_t disk_size;           /* guest size, a multiple of 512 */
  uint32_t cluster_size;
  bool lazy;                    /* lazy_refcounts: repair at open */
  bool discard_shows_initial;   /* v2 with a backing file: discarded
                                   clusters show the backing contents, which
                                   are the initial contents */
  unsigned continue_every;      /* every n-th state: also open it read-write,
                                   write, flush, close, qemu-img check (0:
                                   never) */
};

/* Start tracking.  Call after the engine opened the image (its synchronous
 * writes at open are durable) and before the workload: the file as it is
 * now is the initial image.  initial is the guest contents now (disk_size
 * bytes, copied).
 */
struct cs *cs_new (const struct cs_config *cfg, struct aio *a,
                   const uint8_t *initial);
void cs_free (struct cs *s);

/* A guest request is about to be submitted; returns its id (1, 2, ...).
 * len and off are multiples of 512 for CS_WRITE/CS_ZERO.  fua: the request
 * is durable when its callback runs.
 */
unsigned cs_submit (struct cs *s, enum cs_kind kind, uint64_t off,
                    uint64_t len, bool fua);
/* A flush is about to be submitted; returns its id. */
unsigned cs_submit_flush (struct cs *s);
/* The engine refused request id at submission: forget it. */
void cs_cancel (struct cs *s, unsigned id);
/* The callback of request (or flush) id ran with ret. */
void cs_ack (struct cs *s, unsigned id, int ret);

/* The data guest write id writes at guest offset off (len bytes; off and
 * len multiples of 512).
 */
void cs_fill (unsigned id, uint64_t off, size_t len, void *buf);

/* Number of guest requests and flushes recorded. */
unsigned cs_requests (const struct cs *s);

/* After the workload (its ops all run, the engine closed or idle): judge
 * about max_states crash states, chosen with seed.  Failed checks count in
 * test_failures (testlib.h).  Returns the number of states judged.
 */
unsigned cs_check (struct cs *s, unsigned max_states, uint64_t seed);

/* Counters of the last cs_check, for the summary line. */
struct cs_stats {
  unsigned crash_points;        /* distinct crash points */
  unsigned states;              /* images judged */
  unsigned leaky;               /* of which qemu-img check found leaks */
  unsigned repaired;            /* lazy: repaired at open */
  unsigned continued;           /* reopened read-write and written */
  unsigned failures;            /* states that failed a check */
  unsigned ops;                 /* image writes, punches and syncs logged */
  unsigned syncs;
  double qemu_secs;             /* time spent in qemu-img check */
  double engine_secs;           /* opening and reading states */
};
void cs_get_stats (const struct cs *s, struct cs_stats *st);

#endif /* QNBD_CRASH_SIM_H */
