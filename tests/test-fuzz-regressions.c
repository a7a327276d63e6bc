/* tests/test-fuzz-regressions.c: every input the fuzzers ever found a bug
 * with (tests/fuzz-regressions/), run through the same harness code,
 * without libFuzzer, under the sanitizers of the build.
 */
#include <config.h>

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The harness itself, compiled into this test so that the regressions
 * run exactly the code the fuzzer ran (without linking libFuzzer).
 */
#include "../fuzz/fuzz-qcow2-open.c"

int
main (void)
{
  const char *srcdir = getenv ("srcdir");
  char dir[4096];
  struct dirent *d;
  DIR *dp;
  int n = 0;

  snprintf (dir, sizeof dir, "%s/fuzz-regressions", srcdir ? srcdir : ".");
  dp = opendir (dir);
  if (!dp) {
    perror (dir);
    return 1;
  }
  while ((d = readdir (dp))) {
    char path[8192];
    uint8_t *buf;
    long len;
    FILE *f;

    if (d->d_name[0] == '.')
      continue;
    snprintf (path, sizeof path, "%s/%s", dir, d->d_name);
    f = fopen (path, "rb");
    if (!f || fseek (f, 0, SEEK_END) || (len = ftell (f)) < 0
        || fseek (f, 0, SEEK_SET))
      return 1;
    buf = malloc ((size_t) len + 1);
    if (!buf || fread (buf, 1, (size_t) len, f) != (size_t) len)
      return 1;
    fclose (f);
    LLVMFuzzerTestOneInput (buf, (size_t) len);
    free (buf);
    printf ("ok %d - %s\n", ++n, d->d_name);
  }
  closedir (dp);
  return n > 0 ? 0 : 1;
}
