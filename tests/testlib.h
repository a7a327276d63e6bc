/* tests/testlib.h: helpers shared by the engine's unit tests. */
#ifndef QNBD_TESTLIB_H
#define QNBD_TESTLIB_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "qcow2.h"

extern int test_failures;

#define CHECK(cond, ...) \
  do { \
    if (!(cond)) { \
      fprintf (stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      fprintf (stderr, __VA_ARGS__); \
      fputc ('\n', stderr); \
      test_failures++; \
    } \
  } while (0)

/* A fresh temporary directory for this test (removed at exit). */
const char *test_dir (void);

/* Run a shell command (formatted); returns its exit status. */
int shell (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));

/* Exit 77 (skip) when qemu-img is missing. */
void require_qemu_img (void);

/* Create an image with qemu-img: opts as for -o, size in bytes. */
char *make_image (const char *name, const char *opts, uint64_t size);
/* The same with the engine's own qcow2_create (qnbd-img create), so that
 * its layouts (preallocation=metadata...) are exercised too.
 */
char *create_image (const char *name, const struct qcow2_create_opts *opts);

/* Open with the given backend (NULL: real I/O, the kind from $QNBD_AIO). */
struct qcow2 *open_image (const char *path, struct aio *aio, bool ro);

/* Synchronous wrappers: submit, then run the engine until done. */
int sync_read (struct qcow2 *q, uint64_t off, void *buf, size_t len);
int sync_write (struct qcow2 *q, uint64_t off, const void *buf, size_t len,
                unsigned flags);
int sync_flush (struct qcow2 *q);
int sync_discard (struct qcow2 *q, uint64_t off, uint64_t len);

/* Run the engine (reaping real or fake I/O) until *flag becomes 0 or the
 * engine has nothing in flight.
 */
void run_until (struct qcow2 *q, const int *flag);

/* qemu-img check must report no errors and no leaks. */
bool qemu_img_check_clean (const char *path);

/* The image read through the engine equals shadow (size bytes). */
bool engine_equals (struct qcow2 *q, const uint8_t *shadow, uint64_t size);

/* Write shadow to a raw file and ask qemu-img compare. */
bool qemu_img_compare (const char *path, const uint8_t *shadow,
                       uint64_t size);

/* Deterministic pseudo-random numbers. */
uint64_t rnd (void);
void fill_pattern (uint8_t *buf, size_t len, uint64_t seed);
/* Bytes that do not compress (xorshift), the same for the same seed. */
void fill_noise (uint8_t *buf, size_t len, uint64_t seed);

/* The same as the engine's, which a test of its internals also sees. */
#ifndef QNBD_QCOW2_INTERNAL_H
static inline uint64_t
round_up (uint64_t v, uint64_t a)
{
  return (v + a - 1) / a * a;
}
#endif

/* What an op recorded by the fake backend touched, for the tests of write
 * ordering and of faults in the flusher.
 */
struct aio_fake_record;
enum io_kind {
  IO_DATA, IO_L1, IO_L2, IO_REFBLOCK, IO_REFTABLE, IO_HEADER, IO_SYNC,
  IO_OTHER,                     /* reads (L2 slices, refcount blocks), punches */
};
extern const char *const io_kind_names[];
enum io_kind classify_io (struct qcow2 *q, const struct aio_fake_record *r);

int test_exit (void);

/* A test made of named cases that run and fail one by one.  Each case runs
 * in a child process of its own, so that a case that exits or aborts in the
 * middle (an assert of the engine, a setup step that cannot go on) fails
 * alone; inside a case CHECK keeps going as everywhere.
 *
 *   prog             every case, in order
 *   prog NAME...     those cases, in the order given
 *   prog --list      the names, one a line
 *
 * One line per case on stdout, "ok - NAME" or "not ok - NAME"; returns the
 * exit status for main: 0 when every case passed.  (In gdb, "set
 * follow-fork-mode child" follows the case.)
 */
struct test_case {
  const char *name;
  void (*run) (const void *arg);
  const void *arg;
};
int run_cases (int argc, char **argv, const struct test_case *cases,
               size_t n);

#endif
